"""Run directories: `runs/<name>/` holds config.yaml, run_info.json (git SHA, versions, command),
metrics.csv and checkpoints/ (deepres.training.checkpoints). metrics.csv survives resumes.

One run directory per job, one job per run directory:

- Rank 0 chooses the directory (``claim_run_dir``) and every other rank uses its choice: ranks that Lightning
  starts on one machine inherit it in ``DEEPRES_RUN_DIR``; ranks started together by torchrun or srun read it
  from ``<root>/.claims/<launch key>``, which rank 0 writes (``await_run_dir``).
- A new run claims ``<name>``, else the first free ``<name>-2``, ``-3``, … by locking it and writing ``.claimed``
  in it (creating ``.claimed`` with O_EXCL where the file system has no flock): exactly one process can, so runs
  started together with one name (a sweep, a job array) each get their own directory. A directory that holds
  only what a start writes (``START_FILES``) and that no live process holds is free: a start that failed is
  reused, and one that fails in this process removes its directory (``abandon_unused_claims``).
- A resume (``--ckpt_path``) goes to ``<name>`` exactly as written, never to a numbered sibling; a requeued SLURM
  job goes back to the directory its first start claimed, found by its job id (``job_run_dir``).
- The process that trains holds an exclusive lock (flock) on ``<run_dir>/.lock`` until it exits, so a resume
  into a directory that a live run is writing is refused, naming that run's host and pid.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from deepres.errors import ConfigError
from deepres.files import atomic_write_bytes
from deepres.slurm.requeue import slurm_job_id
from deepres.training.faults import RANKS_DIR

PACKAGES = ("deepres", "torch", "torchvision", "lightning", "torchmetrics", "deepspeed", "webdataset", "wandb",
            "numpy", "jsonargparse")


ENV_RUN_DIR = "DEEPRES_RUN_DIR"  # the run directory rank 0 chose, for the ranks it starts
ENV_RESUME = "DEEPRES_RESUME_FROM"  # the checkpoint rank 0 resumes from, ditto
CLAIMED = ".claimed"
LOCK = ".lock"
CLAIMS = ".claims"


def _numbered(root: Path, name: str) -> list[Path]:
    """root/name, root/name-2, root/name-3, … as they exist, in order."""
    numbered = sorted((p for p in root.glob(f"{name}-*") if p.name[len(name) + 1:].isdigit()),
                      key=lambda p: int(p.name[len(name) + 1:]))
    return [root / name, *numbered]


def resolve_run_dir(root: str | Path, name: str, resuming: bool) -> Path:
    """Where a run would go, without claiming it: when resuming, `root/name` exactly as written (a numbered
    sibling `name-N` is another run); otherwise the first of `root/name`, `root/name-N` that is free."""
    root = Path(root)
    if resuming:
        return root / name
    candidates = (root / (name if n == 1 else f"{name}-{n}") for n in itertools.count(1))
    return next(p for p in candidates if not p.is_dir() or holds_only_start_files(p))


# What a start writes before training does: a directory holding nothing else has no result in it.
START_FILES = {CLAIMED, LOCK, "config.yaml", "hparams.yaml", "run_info.json", RANKS_DIR, "checkpoints"}


def holds_only_start_files(run_dir: Path) -> bool:
    for path in Path(run_dir).iterdir():
        if path.name not in START_FILES or (path.name == "checkpoints" and any(path.iterdir())):
            return False
    return True


def _claim_record() -> str:
    job = f" slurm-job {slurm_job_id()}" if "SLURM_JOB_ID" in os.environ else ""
    return f"{socket.gethostname()} {os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}{job}\n"


def claim_new_run_dir(root: str | Path, name: str) -> Path:
    """Atomically claim the first free directory of `root/name`, `root/name-2`, …: one that holds nothing but
    start files (or is absent) and that this process locks. Two processes never get the same one."""
    root = Path(root)
    for n in itertools.count(1):
        candidate = root / (name if n == 1 else f"{name}-{n}")
        candidate.mkdir(parents=True, exist_ok=True)
        if not holds_only_start_files(candidate) or candidate.resolve() in _held_locks:
            continue  # an older run, or one this process holds
        try:
            locked = lock_run_dir(candidate)
        except ConfigError:
            continue  # a live process is starting in it
        if not holds_only_start_files(candidate):  # it started between the look and the lock
            _release(candidate)
            continue
        if locked:  # nobody else can hold it: what a failed start left is ours to replace
            _remove_start_files(candidate)
            (candidate / CLAIMED).write_text(_claim_record())
        else:  # no flock on this file system: O_EXCL decides
            try:
                fd = os.open(candidate / CLAIMED, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                continue
            with os.fdopen(fd, "w") as f:
                f.write(_claim_record())
        _claimed.append(candidate)
        return candidate
    raise AssertionError("unreachable")


def job_run_dir(root: str | Path, name: str, job_id: str) -> Path | None:
    """The directory of `root/name`, `root/name-N` that SLURM job `job_id` claimed or started in (its
    `.claimed` or run_info.json names the job), or None."""
    for run_dir in reversed(_numbered(Path(root), name)):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if f" slurm-job {job_id}" in (run_dir / CLAIMED).read_text():
                return run_dir
        with contextlib.suppress(OSError, ValueError, AttributeError):
            starts = json.loads((run_dir / "run_info.json").read_text()).get("starts", [])
            if any(start.get("slurm_job_id") == job_id for start in starts):
                return run_dir
    return None


def _remove_start_files(run_dir: Path) -> None:
    for path in run_dir.iterdir():
        if path.name == LOCK:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


_held_locks: dict[Path, int] = {}
_claimed: list[Path] = []  # run directories this process claimed new


def abandon_unused_claims() -> None:
    """Remove the run directories this process claimed and that hold nothing but start files (`START_FILES`): a
    run that failed before it trained leaves no directory behind that would push the next try to `name-2/`."""
    while _claimed:
        run_dir = _claimed.pop()
        with contextlib.suppress(OSError):
            if holds_only_start_files(run_dir):
                _remove_start_files(run_dir)
                (run_dir / LOCK).unlink(missing_ok=True)
                _release(run_dir)
                run_dir.rmdir()


def _release(run_dir: Path) -> None:
    fd = _held_locks.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def lock_run_dir(run_dir: Path, *, wait_s: float = 0.0) -> bool:
    """Hold `run_dir/.lock` exclusively until this process exits; refuse (ConfigError) if a live process holds it.
    Returns False on a file system without flock (then nothing is locked).

    `wait_s`: how long to wait for it (a requeued job whose previous attempt is still being stopped)."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held_locks:
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.5)
                continue
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(
                f"run directory {run_dir} is in use by a live run ({holder}). Wait for it to end, or give this run "
                "another --run.name (without --ckpt_path it gets a directory of its own)."
            ) from None
        except OSError:  # a file system without flock (some parallel file systems): go on unlocked
            os.close(fd)
            return False
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}, since {time.strftime('%H:%M:%S')}".encode(), 0)
    _held_locks[run_dir] = fd
    return True


def release_run_dir_locks() -> None:
    """Let go of the run directories this process holds, and forget the choice it published for the ranks it
    started (at the end of a command run in-process: a test, a notebook)."""
    for fd in _held_locks.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()
    _claimed.clear()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        os.environ.pop(ENV_RUN_DIR, None)
        os.environ.pop(ENV_RESUME, None)


def launch_rank() -> int:
    """This process's global rank as its launcher numbered it (torchrun: RANK; srun: SLURM_PROCID), 0 if alone.

    Processes started by hand with Lightning's variables (NODE_RANK, LOCAL_RANK) count as rank 0 only when both
    are 0."""
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    node, local = (int(os.environ.get(v, "0") or 0) for v in ("NODE_RANK", "LOCAL_RANK"))
    return 0 if node == local == 0 else node * 1000 + local


def launch_key() -> str | None:
    """The same string on every rank of one launch by torchrun or srun (None otherwise)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        e = os.environ
        return f"torchrun-{e['TORCHELASTIC_RUN_ID']}-{e.get('MASTER_ADDR', '')}-{e.get('MASTER_PORT', '')}"
    if "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1:
        e = os.environ
        # An array task by <array job>_<task> (deepres.slurm.requeue.slurm_job_id), as in its log and requeue.
        return f"slurm-{slurm_job_id()}-{e.get('SLURM_STEP_ID', '')}-{e.get('SLURM_RESTART_COUNT', '0')}"
    if "MASTER_PORT" in os.environ and ("NODE_RANK" in os.environ or "LOCAL_RANK" in os.environ):
        return f"env-{os.environ.get('MASTER_ADDR', '')}-{os.environ['MASTER_PORT']}"
    return None


def publish_run_dir(root: Path, run_dir: Path, resume_from: str | None) -> None:
    """Rank 0: tell the ranks started beside it where the run goes and what it resumes from."""
    os.environ[ENV_RUN_DIR] = str(run_dir)
    if resume_from:
        os.environ[ENV_RESUME] = resume_from
    key = launch_key()
    if key is not None:
        record = {"run_dir": str(run_dir), "resume_from": resume_from, "written": time.time()}
        atomic_write_bytes(Path(root) / CLAIMS / key, json.dumps(record).encode())


def await_run_dir(root: Path, *, timeout_s: float = 600.0) -> tuple[Path, str | None]:
    """Ranks > 0 of a torchrun/srun launch: wait for rank 0's choice (run directory, checkpoint to resume)."""
    key = launch_key()
    if key is None:
        raise ConfigError("internal: a rank other than 0 without DEEPRES_RUN_DIR nor a torchrun/srun launch")
    path = Path(root) / CLAIMS / key
    # Ranks of one launch start within seconds; a record older than this process (by a margin) is a stale one
    # from an earlier launch that happened to get the same key.
    not_before = _process_start_time() - 120
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
            if record["written"] >= not_before:
                return Path(record["run_dir"]), record.get("resume_from")
        time.sleep(0.2)
    raise ConfigError(f"rank {launch_rank()}: rank 0 did not choose a run directory within {timeout_s:.0f} s "
                      f"(no {path}). Is {root} on a file system that every node sees?")


def _process_start_time() -> float:
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


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


def package_versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of PACKAGES and the `extra` distributions (pillow, ...); absent ones are left out."""
    versions = {}
    for name in PACKAGES + extra:
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
        "slurm_job_id": slurm_job_id() if "SLURM_JOB_ID" in os.environ else None,
    }


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 7B13"), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def environment(threads: int, packages: tuple[str, ...] = ()) -> str:
    """CPU, threads, load and versions (torch, lightning, deepres, then `packages`): every number in
    docs/results says where it was measured. The one machine description of scripts/ and deepres."""
    v = package_versions(packages)
    more = "".join(f", {name} {v.get(name)}" for name in packages)
    return (f"{cpu_model()}, {os.cpu_count()} cores, torch threads {threads}, load average {os.getloadavg()[0]:.2f} at start; "
            f"python {platform.python_version()}, torch {v.get('torch')}, lightning {v.get('lightning')}, "
            f"deepres {v.get('deepres')} @ {git_sha() or 'unknown'}{more}")


def write_run_info(run_dir: Path) -> None:
    """Append this start (first run or resume) to run_info.json; call on rank 0 only."""
    path = run_dir / "run_info.json"
    starts = json.loads(path.read_text()).get("starts", []) if path.exists() else []
    starts.append(run_info())
    atomic_write_bytes(path, json.dumps({**starts[0], "starts": starts}, indent=2).encode())


FINISHED = "finished.json"


def write_finished(run_dir: Path, trainer: Any) -> None:
    """finished.json: the run trained to its end (not stopped by a signal), with its final metrics (what
    ``deepres sweep-summary`` tabulates); call on rank 0 only."""
    metrics = {}
    for key, value in trainer.callback_metrics.items():
        with contextlib.suppress(TypeError, ValueError, RuntimeError):
            metrics[key] = float(value)
    record = {"global_step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "metrics": metrics}
    atomic_write_bytes(run_dir / FINISHED, json.dumps(record, indent=2).encode())


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
