"""deepres installs as a package: a wheel built from the checkout carries the configs, which are found by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from deepres import config_names
from deepres.errors import ConfigError

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python >= 3.11")
REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_the_package_list_names_every_package_on_disk() -> None:
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "deepres").rglob("__init__.py")}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == on_disk | {"deepres.configs"}
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"deepres.configs": "configs"}


def test_packages_whose_internals_deepres_uses_are_pinned_to_a_minor_version() -> None:
    from importlib.metadata import version

    from packaging.requirements import Requirement

    reqs = {Requirement(r).name: Requirement(r) for r in PYPROJECT["project"]["dependencies"]}
    reqs["deepspeed"] = Requirement(PYPROJECT["project"]["optional-dependencies"]["deepspeed"][0])
    for name in ("lightning", "jsonargparse", "webdataset", "deepspeed"):
        installed = version(name)
        assert reqs[name].specifier.contains(installed), f"{name} {installed} is outside {reqs[name]}"
        major, minor = (int(v) for v in installed.split(".")[:2])
        assert not reqs[name].specifier.contains(f"{major}.{minor + 1}.0"), f"{name} is not pinned to {major}.{minor}"


def test_configs_by_name_and_by_path(tmp_path: Path) -> None:
    configs = config_names.list_configs()
    assert set(configs) == {p.stem for p in (REPO / "configs").glob("*.yaml")}
    assert config_names.resolve_config("resnet110_cifar10") == str(REPO / "configs" / "resnet110_cifar10.yaml")
    assert config_names.resolve_config("resnet110_cifar10.yaml").endswith("configs/resnet110_cifar10.yaml")
    own = tmp_path / "mine.yaml"
    own.write_text("model: {}\n")
    assert config_names.resolve_config_args(["fit", f"--config={own}", "--config", "default"]) == [
        "fit", f"--config={own}", "--config", str(REPO / "configs" / "default.yaml")]
    with pytest.raises(ConfigError, match="Did you mean resnet110_cifar10"):
        config_names.resolve_config("resnet110_cifr10")


def test_a_missing_path_is_one_line_naming_the_folder_and_close_shipped_names(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no such file \(looked from .*\)\. Configs that ship with deepres by a "
                                          r"close name: resnet110_cifar10"):
        config_names.resolve_config("configs/resnet110_cifar.yaml")
    with pytest.raises(ConfigError, match=r"run `deepres configs`") as refused:
        config_names.resolve_config("elsewhere/zzzz.yaml")
    assert "close name" not in str(refused.value)


def test_a_checkout_path_that_is_missing_suggests_the_packaged_name(tmp_path: Path, monkeypatch) -> None:
    # after `pip install`, outside a checkout, `configs/X.yaml` is no file: the packaged X is meant
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"use `--config resnet110_cifar10`"):
        config_names.resolve_config("configs/resnet110_cifar10.yaml")
    with pytest.raises(ConfigError, match="no such file"):  # no packaged config of that name either
        config_names.resolve_config("configs/not_a_config.yaml")


def test_cli_names_a_misspelt_config(capsys) -> None:
    from deepres.cli import main

    assert main(["fit", "--config", "resnt110_cifar10"]) == 2
    assert "deepres configs" in capsys.readouterr().err


@pytest.mark.timeout(300)  # 20 s on 2 CPU cores: the wheel build is 2 s, `--print_config` most of the rest
def test_wheel_installs_into_a_fresh_venv_and_finds_configs_by_name(tmp_path: Path) -> None:
    """Build a wheel from the checkout, install it (not editable) into a new venv, run it from elsewhere.

    The new venv sees this environment's packages through a .pth file (no torch download), sits before
    them on sys.path, and gets the wheel alone (`--no-deps`); that its requirements are met by what it
    sees is checked against the wheel's own metadata."""
    start = time.perf_counter()
    src = tmp_path / "src"  # a copy of the tracked files: building in the checkout would leave build/ there
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("deepres-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    fresh_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True).stdout.strip()
    Path(fresh_site, "outer-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True,
                   capture_output=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    deepres = venv / "bin" / "deepres"
    check = subprocess.run([python, "-c", REQUIREMENTS_MET], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().startswith(fresh_site), check.stdout  # the wheel's deepres, not the checkout's
    listed = subprocess.run([deepres, "configs"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "resnet110_cifar10" in listed.stdout and fresh_site in listed.stdout
    out = subprocess.run([deepres, "fit", "--config", "resnet110_cifar10", "--print_config"], cwd=elsewhere,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "arch: resnet110_cifar" in out.stdout and "milestones:" in out.stdout
    print(f"wheel build + fresh venv + three commands: {time.perf_counter() - start:.1f} s")


REQUIREMENTS_MET = """
import deepres, importlib.metadata as md
from packaging.requirements import Requirement
dist = md.distribution("deepres")
assert dist.read_text("direct_url.json") is None or "editable" not in dist.read_text("direct_url.json")
for line in dist.requires:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": "deepspeed"}):
        continue
    have = md.version(req.name)
    assert req.specifier.contains(have, prereleases=True), f"{req.name} {have} does not satisfy {req}"
print(deepres.__file__)
"""
