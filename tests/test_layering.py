"""The package's layers, checked from the imports of every module under deepres/ (parsed, not run).

Bottom to top; a module imports deepres modules of its own layer or below, never above:

    deepres.errors, .files          standard library only
    deepres.lightning_compat, .devices, .config_names
                                    small shared helpers
    deepres.models, .data           single-device nets and the data they train on
    deepres.parallelize, .pipeline, .slurm
                                    what is applied to a net from outside (activation checkpointing, the
                                    memory budget, compile), cutting it into pipeline stages, job scripts
    deepres.strategies, .observability
                                    DDP/ZeRO/pipeline strategies; diagnostics, dashboards, reports
    deepres.training                the run: its plan, module, checkpoints, the `deepres fit` wiring
    deepres.cli                     the command line

Within the layers, finer rules:
    deepres.models         no training loop, data, strategies, SLURM, lightning, deepspeed, wandb or
                           torch.distributed (parallelism, checkpointing and compilation are applied from outside)
    deepres.observability  the depth probe needs no Lightning, the monitor no probe; the figures are shared by
                           diagnostics and report, so they import neither; diagnostics never the report command
    the shard loader       (deepres.data.shards, .shard_stream, .shard_sets) reads deepres.data.shard_format,
                           never the `deepres shard` writer (.shard_writer, .shard_convert, .shard_index,
                           .shard_jobs, .image_sources)
    the shard writer       and shard_format: no Lightning, torch or loader, so that `deepres shard` starts fast

Every import counts, also one inside a function, because a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "deepres"
SHARD_FORMAT = ("deepres.data.shard_format",)
SHARD_LOADER = ("deepres.data.shards", "deepres.data.shard_stream", "deepres.data.shard_sets")
SHARD_WRITER = ("deepres.data.shard_writer", "deepres.data.shard_convert", "deepres.data.shard_index",
                "deepres.data.shard_jobs", "deepres.data.image_sources")

LAYERS = [
    ("deepres.errors", "deepres.files"),
    ("deepres.lightning_compat", "deepres.devices", "deepres.config_names"),
    ("deepres.models", "deepres.data"),
    ("deepres.parallelize", "deepres.pipeline", "deepres.slurm"),
    ("deepres.strategies", "deepres.observability"),
    ("deepres.training",),
    ("deepres.cli", "deepres.__main__"),
]
PROBE, MONITOR = "deepres.observability.depth_probe", "deepres.observability.perf_monitor"
DIAGNOSTICS, FIGURES, REPORT = "deepres.observability.diagnostics", "deepres.observability.depth_figures", "deepres.observability.report"

# (modules the rule is about, imports they must not have)
RULES = [
    (("deepres.models",),
     ("deepres.training", "deepres.data", "deepres.strategies", "deepres.slurm", "deepres.cli",
      "lightning", "pytorch_lightning", "deepspeed", "wandb", "torch.distributed")),
    ((DIAGNOSTICS, PROBE, MONITOR), (REPORT,)),
    # the diagnostics' two halves stand alone: the probe needs no Lightning, the monitor no probe
    ((PROBE,), ("lightning", DIAGNOSTICS, MONITOR)),
    ((MONITOR,), (DIAGNOSTICS, PROBE)),
    # the pieces both sides share sit below them
    ((FIGURES,), (DIAGNOSTICS, REPORT, "lightning", "wandb")),
    (("deepres.files", "deepres.errors"), ("torch", "lightning", "numpy")),
    # training reads shards through the format module; converting, indexing and verifying stay out of it
    (SHARD_LOADER + SHARD_FORMAT, SHARD_WRITER),
    (SHARD_WRITER + SHARD_FORMAT, ("lightning", "pytorch_lightning", "torch", "deepres.data.base",
                                   "deepres.data.recipes", *SHARD_LOADER)),
]
# every layer: nothing from the layers above it
RULES += [(layer, tuple(m for above in LAYERS[i + 1:] for m in above)) for i, layer in enumerate(LAYERS)]


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    """`name` is one of `prefixes` or inside one (dotted: deepres.data.shards is in deepres.data)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file. `from a import b` yields a and a.b, as
    b may be a module; relative imports are resolved against the file's package."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            found.append((node.lineno, source))
            found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    """One line per forbidden import statement and rule: `file:line: module imports name (rule)`."""
    lines = {}
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        for rule, (subjects, forbidden) in enumerate(RULES):
            if not within(module, subjects):
                continue
            for lineno, name in imports(path, root):
                if within(name, forbidden) and not within(name, (module,)):
                    lines.setdefault((str(path), lineno, rule), (
                        f"{path.relative_to(root.parent)}:{lineno}: {module} imports {name} "
                        f"({' / '.join(subjects)} must not import {' / '.join(forbidden)})"))
    return sorted(lines.values())


def test_every_layer_keeps_to_its_imports():
    found = violations()
    assert not found, "forbidden imports:\n" + "\n".join(found)


def test_the_check_names_the_offending_import(tmp_path):
    """The rules do catch a violation, including a lazy or relative one, and say where it is."""
    pkg = tmp_path / "deepres"
    (pkg / "models").mkdir(parents=True)
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "net.py").write_text("import torch\n\n\ndef f():\n    from ..data import digits\n")
    (pkg / "observability").mkdir()
    (pkg / "observability" / "diagnostics.py").write_text("from deepres.observability import report\n")
    (pkg / "parallelize").mkdir()
    (pkg / "parallelize" / "budget.py").write_text("def f():\n    from deepres.training import module\n")
    found = violations(pkg)
    assert any(line.startswith("deepres/models/net.py:5: deepres.models.net imports deepres.data")
               for line in found), found
    assert any(line.startswith("deepres/observability/diagnostics.py:1: deepres.observability.diagnostics imports "
                               "deepres.observability.report") for line in found), found
    # a layer importing one above it: the layer rule itself
    assert any(line.startswith("deepres/parallelize/budget.py:2: deepres.parallelize.budget imports deepres.training")
               and "must not import" in line for line in found), found
    assert len(found) == 3, found  # `import torch` in deepres.models is allowed


def test_every_package_is_in_a_layer():
    """A new package or top-level module has to be placed in a layer, else no rule covers it."""
    placed = {m for layer in LAYERS for m in layer}
    top = {module_name(p, PACKAGE) for p in PACKAGE.glob("*.py")} | {
        f"deepres.{p.name}" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert top - {"deepres"} - {"deepres.configs"} <= placed, sorted(top - placed)


def test_the_shard_loader_and_writer_rules_cover_every_shard_module():
    """A new shard module has to be placed on one side (or be the format), else the rules miss it."""
    data = {module_name(p, PACKAGE) for p in (PACKAGE / "data").glob("*.py")}
    shard_modules = {m for m in data if "shard" in m.rpartition(".")[2] or m.endswith("image_sources")}
    assert shard_modules == set(SHARD_FORMAT + SHARD_LOADER + SHARD_WRITER)


def test_the_check_catches_a_loader_importing_the_writer(tmp_path):
    pkg = tmp_path / "deepres"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "shard_stream.py").write_text("def f():\n    from deepres.data.shard_index import verify\n")
    (pkg / "data" / "shard_convert.py").write_text("import lightning\nfrom deepres.data import shard_format\n")
    found = violations(pkg)
    assert any(line.startswith("deepres/data/shard_stream.py:2: deepres.data.shard_stream imports "
                               "deepres.data.shard_index") for line in found), found
    assert any(line.startswith("deepres/data/shard_convert.py:1: deepres.data.shard_convert imports lightning")
               for line in found), found
    assert len(found) == 2, found  # the writer may read the format


def imported_at_runtime(module: str, forbidden: tuple[str, ...], preload: str = "") -> list[str]:
    """The modules named by `forbidden` (or inside them) that importing `module` loads, in a fresh
    interpreter that has imported `preload` first (those count as already there)."""
    code = (
        f"import sys{', ' + preload if preload else ''}; before = set(sys.modules); import {module}; "
        f"print(sorted(m for m in set(sys.modules) - before if m.startswith({forbidden!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return ast.literal_eval(done.stdout.strip().splitlines()[-1])


def test_shard_command_imports_neither_lightning_nor_torch_at_runtime():
    """`deepres shard` (and the format it shares with the loader) pulls in no training stack transitively."""
    forbidden = ("lightning", "pytorch_lightning", "torch", "deepres.data.shards", "deepres.data.base")
    assert imported_at_runtime("deepres.data.shard_writer", forbidden) == []


def test_models_import_no_distributed_stack_at_runtime():
    """What the models import transitively (which parsing one file cannot see) holds the same line."""
    forbidden = ("lightning", "pytorch_lightning", "deepspeed", "wandb", "torch.distributed")
    assert imported_at_runtime("deepres.models", forbidden, preload="torch") == []
