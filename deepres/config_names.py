"""Configs by name: `deepres fit --config resnet110_cifar10` finds the YAML that ships with deepres.

    deepres configs                                   # the names, each with its first comment line
    deepres fit --config resnet110_cifar10            # the packaged configs/resnet110_cifar10.yaml
    deepres fit --config ./my_run.yaml                # a path is used as it is

The configs live in the top-level `configs/` folder of the repository; the wheel carries the same
files as `deepres/configs/` (pyproject.toml maps the folder into the package at build time), so an
installed deepres and a checkout find them the same way, from one copy.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path

from deepres.errors import ConfigError

_PACKAGE = Path(__file__).resolve().parent


def configs_dir() -> Path:
    """deepres/configs/ of an installed wheel, else the checkout's configs/ (source tree, editable install)."""
    for folder in (_PACKAGE / "configs", _PACKAGE.parent / "configs"):
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return folder
    raise ConfigError(f"no configs found in {_PACKAGE / 'configs'} or {_PACKAGE.parent / 'configs'}: this "
                      "deepres was installed without its package data. Reinstall it with pip.")


def list_configs() -> dict[str, Path]:
    """Config name (file stem) -> path, sorted by name."""
    return {p.stem: p for p in sorted(configs_dir().glob("*.yaml"))}


def resolve_config(value: str) -> str:
    """A path that exists stays as it is; a bare name (with or without .yaml) becomes the packaged file."""
    if os.path.exists(value):
        return value
    if os.sep in value or "/" in value:
        # `--config configs/X.yaml` outside a checkout (after pip install): the packaged X is what was meant
        stem = Path(value).name.removesuffix(".yaml")
        if value.endswith(".yaml") and stem in list_configs():
            raise ConfigError(f"--config {value}: no such file. deepres ships a config of that name: use "
                              f"`--config {stem}` (it works from any directory).")
        close = difflib.get_close_matches(stem, list_configs(), n=3)
        hint = f" Configs that ship with deepres by a close name: {', '.join(close)} (`--config NAME`)." if close else ""
        raise ConfigError(f"--config {value}: no such file (looked from {os.getcwd()}).{hint} "
                          "Check the path, or run `deepres configs` for the configs that ship with deepres.")
    name = value[: -len(".yaml")] if value.endswith(".yaml") else value
    configs = list_configs()
    if name in configs:
        return str(configs[name])
    close = difflib.get_close_matches(name, configs, n=3)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ConfigError(f"--config {value!r} is neither a file nor the name of a config that ships with deepres.{hint} "
                      f"Run `deepres configs` for the names: {', '.join(configs)}.")


def resolve_config_args(argv: list[str]) -> list[str]:
    """argv with every `--config NAME` / `--config=NAME` turned into the packaged config's path."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config" and i + 1 < len(argv):
            out += [arg, resolve_config(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve_config(arg.split("=", 1)[1])
        out.append(arg)
        i += 1
    return out


def _summary(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def main(argv: list[str] | None = None) -> int:
    """`deepres configs`: list the configs that `--config NAME` accepts."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: deepres configs          list the configs that `deepres fit --config NAME` accepts")
        return 0
    try:
        configs = list_configs()
    except ConfigError as exc:
        print(f"deepres configs: error: {exc}", file=sys.stderr)
        return 2
    width = max(map(len, configs))
    for name, path in configs.items():
        print(f"{name:{width}s}  {_summary(path)}")
    print(f"\n({len(configs)} configs in {configs_dir()}; use one with `deepres fit --config NAME`)")
    return 0
