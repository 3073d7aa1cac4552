"""A sweep: the product of a few training-config keys' values, run as one SLURM job array.

    deepres submit --sweep model.depth=10,100,1000 --sweep model.gate=plain,highway --array-limit 2 ...

gives six points, array tasks 0-5 in the order of the product (the last key varies fastest), and the layout

    runs/<name>/submit.sbatch            the one script (#SBATCH --array=0-5%2)
    runs/<name>/sweep.json               keys, values, and every point: task id, run directory, overrides
    runs/<name>/slurm-<array>_<task>.out each task's log (appended to across its requeues)
    runs/<name>/depth=10,gate=plain/     one run directory per point, named after its values
                                         (config.yaml, metrics.csv, checkpoints/, finished.json ...)

Each array task is a job of its own to SLURM: it is preempted, requeued (``scontrol requeue <array>_<task>``,
deepres.slurm.requeue) and resumed from its own run directory without touching the others.
``deepres sweep-summary runs/<name>`` tabulates the points' final metrics (deepres.observability.sweep_summary).

Standard library only.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from deepres.errors import ConfigError
from deepres.slurm.requeue import SWEEP_POINT_FILE

SWEEP_FILE = "sweep.json"
# Written by `deepres submit` into each point's run directory: the job's own run directory, kept after requeues
# (deepres.slurm.requeue.submitted_run_dir).
POINT_FILE = SWEEP_POINT_FILE
_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
# A value names a directory and is a shell word: plain characters only (numbers, names, 1e-3, -1).
_VALUE = re.compile(r"^[A-Za-z0-9_.+-]+$")
# Keys that set what SLURM is asked for: one array asks the same of every task.
_RESOURCE_KEYS = ("trainer.devices", "trainer.num_nodes", "trainer.accelerator", "trainer.strategy")


@dataclass(frozen=True)
class Point:
    index: int
    values: dict[str, str]
    name: str

    def overrides(self) -> list[str]:
        return [item for key, value in self.values.items() for item in (f"--{key}", value)]


@dataclass(frozen=True)
class Sweep:
    keys: list[str]
    values: dict[str, list[str]]

    @classmethod
    def parse(cls, specs: list[str], overrides: list[str] = ()) -> Sweep:
        """``["model.depth=10,100", "model.gate=plain,highway"]`` -> a Sweep. Raises ConfigError."""
        keys: list[str] = []
        values: dict[str, list[str]] = {}
        for spec in specs:
            key, eq, listed = spec.partition("=")
            key = key.strip().removeprefix("--")
            if not eq or not _KEY.match(key):
                raise ConfigError(f"--sweep {spec!r}: give KEY=V1,V2,... with a dotted config key, "
                                  "e.g. --sweep model.depth=10,100,1000.")
            items = [v.strip() for v in listed.split(",")]
            bad = [v for v in items if not _VALUE.match(v)]
            if bad or not items:
                raise ConfigError(f"--sweep {spec!r}: {bad[0] if bad else listed!r} is not a plain value; values "
                                  "name run directories, so use letters, digits, '.', '_', '+' and '-'.")
            if len(set(items)) != len(items):
                raise ConfigError(f"--sweep {spec!r}: a value is listed twice.")
            if key in values:
                raise ConfigError(f"--sweep {key} is given twice. Fix: list all its values in one --sweep.")
            if key in _RESOURCE_KEYS:
                raise ConfigError(f"--sweep {key}: every task of a job array gets the same resources. Fix: submit "
                                  "one job (or sweep) per value of it.")
            if any(arg == f"--{key}" or arg.startswith(f"--{key}=") for arg in overrides):
                raise ConfigError(f"--sweep {key} and the override --{key}: one would silently win. "
                                  "Fix: drop the override, or the --sweep.")
            keys.append(key)
            values[key] = items
        return cls(keys, values)

    def short_names(self) -> dict[str, str]:
        """model.depth -> depth; the full key where two keys end alike (model.num_classes, data.num_classes)."""
        last = [k.rsplit(".", 1)[-1] for k in self.keys]
        return {k: (s if last.count(s) == 1 else k) for k, s in zip(self.keys, last, strict=True)}

    def points(self) -> list[Point]:
        short = self.short_names()
        found = []
        for index, combo in enumerate(itertools.product(*(self.values[k] for k in self.keys))):
            values = dict(zip(self.keys, combo, strict=True))
            found.append(Point(index, values, ",".join(f"{short[k]}={v}" for k, v in values.items())))
        return found

    def checks(self) -> list[Point]:
        """Points that together hold every value of every key (the first point, then one key changed at a
        time): what ``deepres submit`` resolves with ``deepres fit --print_config`` before queueing anything."""
        first = {k: v[0] for k, v in self.values.items()}
        wanted = [first] + [{**first, k: v} for k in self.keys for v in self.values[k][1:]]
        by_values = {tuple(p.values.values()): p for p in self.points()}
        return [by_values[tuple(w[k] for k in self.keys)] for w in wanted]

    def write(self, sweep_dir: Path, *, array_limit: int | None) -> None:
        """sweep.json in the sweep directory, and each point's run directory with its POINT_FILE."""
        points = self.points()
        record = {"keys": self.keys, "values": self.values, "array_limit": array_limit,
                  "points": [{"task": p.index, "name": p.name, "values": p.values} for p in points]}
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(record, indent=2) + "\n")
        for p in points:
            (sweep_dir / p.name).mkdir(exist_ok=True)
            (sweep_dir / p.name / POINT_FILE).write_text(json.dumps({"task": p.index, "values": p.values}) + "\n")


def record_array_job(sweep_dir: Path, job_id: str) -> None:
    """Note the array job id in sweep.json once sbatch has given it (the task logs are named by it)."""
    record = load_sweep(sweep_dir)
    (Path(sweep_dir) / SWEEP_FILE).write_text(json.dumps({**record, "array_job": job_id}, indent=2) + "\n")


def load_sweep(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{sweep_dir}: no {SWEEP_FILE}; give the directory `deepres submit --sweep` wrote "
                          "(runs/<name>).") from None
