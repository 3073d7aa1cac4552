"""Run directories: `runs/<name>/` holds config.yaml, run_info.json (git SHA, versions, command),
metrics.csv and checkpoints/. Checkpoints are written atomically, and metrics.csv survives resumes."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO

PACKAGES = ("deepres", "torch", "torchvision", "lightning", "torchmetrics", "deepspeed", "webdataset", "wandb",
            "numpy", "jsonargparse")


def resolve_run_dir(root: str | Path, name: str, resuming: bool) -> Path:
    """`root/name`, or, when that already holds a run and we are not resuming, the first free
    `root/name-2`, `-3`, … (nothing already written is touched). When resuming, the newest of them."""
    root = Path(root)
    base = root / name
    taken = [base] + sorted(
        (p for p in root.glob(f"{name}-*") if p.name[len(name) + 1 :].isdigit()),
        key=lambda p: int(p.name[len(name) + 1 :]),
    )
    existing = [p for p in taken if p.exists() and any(p.iterdir())]
    if resuming:
        return existing[-1] if existing else base
    if not existing:
        return base
    n = max([1] + [int(p.name[len(name) + 1 :]) for p in existing if p != base]) + 1
    return root / f"{name}-{n}"


def git_sha(cwd: str | Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd or Path(__file__).parent, capture_output=True, text=True, timeout=5).stdout
        return (sha + ("-dirty" if dirty.strip() else "")) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def run_info() -> dict[str, Any]:
    return {
        "git_sha": git_sha(),
        "versions": package_versions(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "command": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def environment(threads: int) -> str:
    """CPU, threads, load and versions: every number in docs/results says where it was measured."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    v = package_versions()
    return (f"{cpu}, {os.cpu_count()} cores, torch threads {threads}, load average {os.getloadavg()[0]:.2f} at start; "
            f"python {platform.python_version()}, torch {v.get('torch')}, lightning {v.get('lightning')}, "
            f"deepres {v.get('deepres')} @ {git_sha() or 'unknown'}")


def write_run_info(run_dir: Path) -> None:
    """Append this start (first run or resume) to run_info.json; call on rank 0 only."""
    path = run_dir / "run_info.json"
    starts = json.loads(path.read_text()).get("starts", []) if path.exists() else []
    starts.append(run_info())
    atomic_write_bytes(path, json.dumps({**starts[0], "starts": starts}, indent=2).encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a crash at
    any point leaves either the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O with write-to-temp + fsync + rename for local paths."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # object stores: Lightning's own (transactional) writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        import io

        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also saves last.ckpt at the step where `max_steps` stops training.

    Lightning would otherwise save it in on_train_epoch_end of the cut-short epoch, in a state
    (epoch counter advanced, batch counter not reset) from which a resume cannot tell which
    batches of the epoch were already seen."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        at_end = 0 < trainer.max_steps <= trainer.global_step
        if at_end and self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class _ResumingWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (Lightning's writer deletes it when the directory is not empty)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = f.readline().strip()
            self.metrics_keys = header.split(",") if header else []


class RunCSVLogger(CSVLogger):
    """CSVLogger writing `<run_dir>/metrics.csv` directly, appending across resumes."""

    def __init__(self, run_dir: str | Path):
        run_dir = Path(run_dir)
        super().__init__(save_dir=str(run_dir.parent), name=run_dir.name, version="")

    @property
    def experiment(self):
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumingWriter(log_dir=self.log_dir)
        return self._experiment


def truncate_metrics(run_dir: Path, after_step: int) -> None:
    """Drop metrics.csv rows logged after `after_step` (they belong to work the resumed checkpoint
    does not contain and will be logged again)."""
    import csv

    path = Path(run_dir) / "metrics.csv"
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if not r.get("step") or int(float(r["step"])) <= after_step]
    if len(kept) == len(rows):
        return
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(kept)
    atomic_write_bytes(path, out.getvalue().encode())
