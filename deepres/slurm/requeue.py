"""Preemption on SLURM: checkpoint, requeue, resume from the newest complete checkpoint.

How a deepres job survives preemption and time limits (the sbatch template sets
``--signal=USR1@<lead> --requeue``, so SLURM sends SIGUSR1 to every task ``lead`` seconds before the time
limit, and ``scancel --signal=USR1`` does the same on demand):

1. ``install_early_signal_handler()`` runs first thing in ``deepres fit`` (before Lightning is imported).
   Until training starts there is nothing to save, so a SIGUSR1 in that window makes rank 0 requeue the
   job at once. Without it the default action of SIGUSR1 kills the task and the job ends FAILED or, behind
   a batch script whose last command succeeds, COMPLETED, with nothing requeued.
2. Once training runs, the handler only records the signal. ``RunCheckpoint`` (deepres.training.run_checkpoint)
   checks the record after every optimizer step through ``SlurmRequeue`` (deepres.slurm.callback), agrees on it
   across ranks, saves ``checkpoints/last.ckpt`` atomically and rank 0 runs ``scontrol requeue``: at most the
   step in flight is lost.
3. When SLURM starts the job again (``SLURM_RESTART_COUNT`` >= 1), the training CLI keeps the same run
   directory (``submitted_run_dir``) and resumes from the newest checkpoint of that run that is complete and
   loads (deepres.training.checkpoints.find_resume_checkpoint), whatever wrote it.

Why not Lightning's own ``SLURMEnvironment(auto_requeue=True)``: its handler saves the checkpoint inside
the signal handler, i.e. wherever each rank happens to be (mid-backward, inside a collective), it is not
installed at all when any SIGUSR1 handler exists (so it cannot be combined with an early one), and on
restart it resumes from the highest ``hpc_ckpt_N`` even when a newer ``last.ckpt`` exists (Lightning
issues #13773, #19782, #20347). deepres keeps Lightning's ``SLURMEnvironment`` for ranks and addresses and
turns its requeue off (``callback.slurm_environment()``).

This module imports only the standard library: it must be importable in milliseconds, before torch.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

REQUEUE_SIGNAL = signal.SIGUSR1
# Seconds before the time limit at which SLURM sends REQUEUE_SIGNAL (the template's --signal=USR1@lead).
DEFAULT_SIGNAL_LEAD = 120
# `deepres submit` writes the job script here, inside the run directory it prepares for the job.
SUBMIT_SCRIPT = "submit.sbatch"
# ... and, for a sweep, this file into each point's run directory (deepres.slurm.sweep.POINT_FILE).
SWEEP_POINT_FILE = "sweep_point.json"


@dataclass
class _RequeueState:
    requested: bool = False  # a requeue signal arrived (or the time limit is near) and is not handled yet
    training: bool = False  # the training loop runs: RequeueOnSignal handles requests at step boundaries
    requeued: bool = False  # this process already asked SLURM to requeue the job


_state = _RequeueState()


# ---------------------------------------------------------------------------------------- environment
def in_slurm_job() -> bool:
    """True inside a SLURM job step that deepres should treat as a batch job.

    Job names "bash" and "interactive" are Lightning's convention for an interactive allocation
    (``srun --job-name=interactive --pty bash``), which cannot be requeued.
    """
    return "SLURM_JOB_ID" in os.environ and os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def global_rank() -> int:
    """This task's rank as srun numbered it (valid before torch.distributed starts)."""
    return int(os.environ.get("SLURM_PROCID", "0"))


def restart_count() -> int:
    """How many times SLURM has requeued and restarted this job (0 on the first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def slurm_job_id() -> str:
    """The id `scontrol requeue` needs: ``<array job>_<task>`` for array jobs, else the job id.

    Requeueing an array task by its plain job id would requeue the whole array (Lightning #15022).
    """
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ["SLURM_JOB_ID"]


def _say(message: str) -> None:
    # os.write, not print: this runs inside signal handlers, where re-entering a buffered stream that
    # the interrupted code was writing to raises "reentrant call".
    os.write(2, f"[deepres.slurm rank {global_rank()}] {message}\n".encode())


# -------------------------------------------------------------------------------------------- requeue
def requeue_job() -> bool:
    """Ask SLURM to requeue this job; SLURM then stops every task and starts the job again."""
    job_id = slurm_job_id()
    try:
        result = subprocess.run(
            ["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        # e.g. inside a container without the SLURM client (Lightning #21404)
        _say(f"could not run `scontrol requeue {job_id}` ({err}); the job will not restart by itself")
        return False
    if result.returncode != 0:
        _say(f"`scontrol requeue {job_id}` failed: {result.stderr.strip()}; the job will not restart by itself")
        return False
    _say(f"requeued SLURM job {job_id}")
    return True


def _on_requeue_signal(signum: int, _frame: object) -> None:
    _state.requested = True
    if _state.training or _state.requeued:
        return  # RequeueOnSignal saves and requeues at the next step boundary
    if global_rank() == 0:
        _say(f"{signal.Signals(signum).name} before training started: nothing to save, requeueing now")
        _state.requeued = requeue_job()


def install_early_signal_handler() -> bool:
    """Record SIGUSR1 from now on and requeue the job if it arrives before training starts.

    Call it at the very start of ``deepres fit`` (before importing Lightning). Does nothing outside a
    SLURM job or off the main thread; returns whether the handler is installed. Idempotent.
    """
    if not in_slurm_job() or threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(REQUEUE_SIGNAL) is not _on_requeue_signal:
        signal.signal(REQUEUE_SIGNAL, _on_requeue_signal)
        # One line per rank: from here on a signal to this task is safe (before, it would kill it).
        _say(f"SLURM job {slurm_job_id()} restart {restart_count()}: SIGUSR1 -> checkpoint and requeue")
    return True


def requeue_requested() -> bool:
    """A requeue signal arrived and has not been handled yet."""
    return _state.requested


def mark_training_started() -> None:
    """From now on a signal is handled at a step boundary (by RequeueOnSignal), not at once."""
    _state.training = True


def clear_request() -> None:
    """The pending request is handled: a checkpoint has been saved."""
    _state.requested = False


def requeue_once() -> bool:
    """Requeue the job unless this process already has; whether it is requeued."""
    if not _state.requeued:
        _state.requeued = requeue_job()
    return _state.requeued


# ------------------------------------------------------------------------------------------- resuming
def submitted_run_dir(root: str | os.PathLike[str], name: str) -> Path | None:
    """Inside a job from ``deepres submit``: the run directory it prepared (it holds submit.sbatch).

    The job writes there on its first start and after every requeue; without this the training CLI would
    see a non-empty ``runs/<name>`` and move to ``runs/<name>-2``.
    """
    path = Path(root) / name
    prepared = (path / SUBMIT_SCRIPT).is_file() or (path / SWEEP_POINT_FILE).is_file()  # a run, or a sweep's point
    return path if in_slurm_job() and prepared else None


def restart_message(resumed_from: os.PathLike[str] | None) -> str:
    """The job log's line for a restarted job: where it picks up."""
    where = f"resuming from {resumed_from}" if resumed_from else "no complete checkpoint yet, starting from scratch"
    return f"[deepres.slurm] restart {restart_count()} of job {slurm_job_id()}: {where}"


# ----------------------------------------------------------------------------------------- time limits
_TIME_FORMAT = re.compile(r"^(?:(?P<days>\d+)-)?(?P<rest>\d+(?::\d+){0,2})$")


def parse_slurm_time(value: str) -> int | None:
    """Seconds in a SLURM time string; None for "UNLIMITED"/"INFINITE".

    Formats as in ``sbatch --time``: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S. Raises ValueError otherwise.
    """
    text = value.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "-1"):
        return None
    match = _TIME_FORMAT.match(text)
    if not match:
        raise ValueError(f"{value!r} is not a SLURM time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
    parts = [int(p) for p in match["rest"].split(":")]
    if match["days"] is not None:
        days = int(match["days"])
        hours, minutes, seconds = (parts + [0, 0])[:3]  # D-H, D-H:M, D-H:M:S
    else:
        days = 0
        hours, minutes, seconds = {1: [0, parts[0], 0], 2: [0, *parts], 3: parts}[len(parts)]
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def time_left() -> int | None:
    """Seconds until this job's time limit as slurmctld sees it; None if unknown or unlimited."""
    try:
        result = subprocess.run(
            ["squeue", "-h", "-j", os.environ["SLURM_JOB_ID"], "-o", "%L"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        return parse_slurm_time(result.stdout.strip()) if result.returncode == 0 else None
    except (OSError, KeyError, ValueError, subprocess.TimeoutExpired):
        return None


def signal_lead() -> int:
    """Seconds before the time limit at which to checkpoint (the template exports DEEPRES_SIGNAL_LEAD)."""
    return int(os.environ.get("DEEPRES_SIGNAL_LEAD", DEFAULT_SIGNAL_LEAD))
