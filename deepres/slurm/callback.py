"""The Lightning side of SLURM requeue (see deepres.slurm.requeue for the whole story).

The training CLI hands the policy to its RunCheckpoint and the plugins to the Trainer (nothing outside a
SLURM job)::

    policy, plugins = slurm_requeue_and_plugins()
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment

from deepres.slurm import requeue


def slurm_environment() -> SLURMEnvironment:
    """Lightning's SLURM cluster environment with its signal handling off.

    deepres's handler (installed early, kept by Lightning because one already exists) and
    SlurmRequeue do the requeue; ``auto_requeue=False`` also keeps Lightning from swallowing SIGTERM
    ("Bypassing SIGTERM"), so a job that SLURM stops does stop.
    """
    return SLURMEnvironment(auto_requeue=False)


def slurm_requeue_and_plugins() -> tuple[SlurmRequeue | None, list[SLURMEnvironment]]:
    """What a Trainer inside a SLURM job needs: the requeue policy for RunCheckpoint, and the cluster
    environment when the process was started by srun (Lightning's own detection, which needs SLURM_NTASKS)."""
    if not requeue.in_slurm_job():
        return None, []
    return SlurmRequeue(), [slurm_environment()] if SLURMEnvironment.detect() else []


class SlurmRequeue:
    """RunCheckpoint's requeue policy in a SLURM job: due after SIGUSR1 (or ``lead`` seconds before the time
    limit); once RunCheckpoint has saved last.ckpt, stopped training and finished the loggers, rank 0 runs
    ``scontrol requeue``.

    RunCheckpoint checks after every optimizer step on every rank and agrees across ranks, so all ranks save at
    the same step even if the signal reached them during different steps; saving inside the signal handler
    instead (Lightning's way) can start a collective on one rank while another is inside a gradient all-reduce.
    """

    signal_name = requeue.REQUEUE_SIGNAL.name

    def __init__(self, lead: int | None = None) -> None:
        """``lead``: seconds before the time limit (default: the template's DEEPRES_SIGNAL_LEAD); a fallback for
        scripts that lack ``--signal``."""
        self.lead = lead
        self._deadline: float | None = None  # time.monotonic() at which to checkpoint; rank 0 only

    def start(self, trainer: pl.Trainer) -> None:
        requeue.install_early_signal_handler()  # in case the CLI did not (a Trainer built by hand)
        requeue.mark_training_started()
        if trainer.is_global_zero:
            # In the job log: where a (re)started job picks up.
            print(f"[deepres.slurm] training from step {trainer.global_step}", flush=True)
        if trainer.is_global_zero and requeue.in_slurm_job():
            left = requeue.time_left()
            lead = self.lead if self.lead is not None else requeue.signal_lead()
            if left is not None:
                self._deadline = time.monotonic() + max(left - lead, 0)

    def due(self) -> bool:
        return requeue.requeue_requested() or (self._deadline is not None and time.monotonic() >= self._deadline)

    def after_save(self, trainer: pl.Trainer, path: Path) -> None:
        self._deadline = None
        requeue.clear_request()
        if trainer.is_global_zero:
            print(f"[deepres.slurm] step {trainer.global_step}: saved {path}", flush=True)
            if not requeue.requeue_once():
                print(f"[deepres.slurm] the job is not requeued; training stopped at step {trainer.global_step}. "
                      "Resume with --ckpt_path last.", flush=True)
        # Training has stopped at this step (RunCheckpoint): after the requeue SLURM stops the job step within
        # seconds, SIGTERM to every process, and starts the job again from this checkpoint.
