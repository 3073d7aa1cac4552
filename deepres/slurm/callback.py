"""The Lightning side of SLURM requeue (see deepres.slurm.requeue for the whole story).

The training CLI adds both to the Trainer (nothing outside a SLURM job)::

    callbacks, plugins = slurm_callbacks_and_plugins()
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from typing_extensions import override

from deepres.slurm import requeue


def slurm_environment() -> SLURMEnvironment:
    """Lightning's SLURM cluster environment with its signal handling off.

    deepres's handler (installed early, kept by Lightning because one already exists) and
    RequeueOnSignal do the requeue; ``auto_requeue=False`` also keeps Lightning from swallowing SIGTERM
    ("Bypassing SIGTERM"), so a job that SLURM stops does stop.
    """
    return SLURMEnvironment(auto_requeue=False)


def slurm_callbacks_and_plugins() -> tuple[list[Callback], list[SLURMEnvironment]]:
    """What a Trainer inside a SLURM job needs: RequeueOnSignal, and the cluster environment when the
    process was started by srun (Lightning's own detection, which needs SLURM_NTASKS)."""
    if not requeue.in_slurm_job():
        return [], []
    return [RequeueOnSignal()], [slurm_environment()] if SLURMEnvironment.detect() else []


class RequeueOnSignal(Callback):
    """After SIGUSR1 (or ``lead`` seconds before the time limit): save ``requeue.ckpt``, requeue the job.

    The check runs after every optimizer step on every rank and is agreed on with one all-reduce of a
    flag, so all ranks save at the same step even if the signal reached them during different steps;
    saving inside the signal handler instead (Lightning's way) can start a collective on one rank while
    another is inside a gradient all-reduce. The checkpoint is written to ``requeue.ckpt.tmp`` and renamed,
    so a kill during the save leaves the previous complete checkpoint in place.
    """

    def __init__(self, dirpath: str | None = None, lead: int | None = None) -> None:
        """``dirpath``: where requeue.ckpt goes (default: ModelCheckpoint's directory, else
        ``<default_root_dir>/checkpoints``). ``lead``: seconds before the time limit (default: the
        template's DEEPRES_SIGNAL_LEAD); a fallback for scripts that lack ``--signal``."""
        self.dirpath = dirpath
        self.lead = lead
        self._deadline: float | None = None  # time.monotonic() at which to checkpoint; rank 0 only
        self._checked_step = -1  # global step of the last check

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Before Lightning registers its handlers (it keeps an existing SIGUSR1 handler), in case the
        # CLI did not install ours early.
        if stage == "fit":
            requeue.install_early_signal_handler()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        requeue.mark_training_started()
        self._checked_step = trainer.global_step
        if trainer.is_global_zero:
            # In the job log: where a (re)started job picks up.
            print(f"[deepres.slurm] training from step {trainer.global_step}", flush=True)
        if trainer.is_global_zero and requeue.in_slurm_job():
            left = requeue.time_left()
            lead = self.lead if self.lead is not None else requeue.signal_lead()
            if left is not None:
                self._deadline = time.monotonic() + max(left - lead, 0)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._checked_step:
            return  # inside gradient accumulation: a checkpoint here would drop the accumulated gradients
        self._checked_step = trainer.global_step
        due = requeue.requeue_requested() or (self._deadline is not None and time.monotonic() >= self._deadline)
        if not trainer.strategy.reduce_boolean_decision(due, all=False):
            return
        self._deadline = None
        path = self.save(trainer)
        requeue.clear_request()
        if trainer.is_global_zero:
            print(f"[deepres.slurm] step {trainer.global_step}: saved {path}", flush=True)
            requeue.requeue_once()
        # Training goes on: after a successful requeue SLURM stops the job within seconds (SIGTERM);
        # if the requeue failed, the run may still finish before the time limit.

    def checkpoint_dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath:
            return Path(checkpoint.dirpath)
        return Path(trainer.default_root_dir) / "checkpoints"

    def save(self, trainer: pl.Trainer) -> Path:
        """Save a full training checkpoint on all ranks; rank 0 moves it into place when complete."""
        final = self.checkpoint_dir(trainer) / requeue.REQUEUE_CHECKPOINT
        partial = final.with_name(final.name + ".tmp")
        trainer.save_checkpoint(partial)  # collective: every rank calls it; ends with a barrier
        if trainer.is_global_zero:
            if final.is_dir():  # sharded strategies write directories, which os.replace cannot overwrite
                shutil.rmtree(final)
            os.replace(partial, final)
        trainer.strategy.barrier("deepres.requeue_checkpoint")
        return final
