"""When a run saves ``checkpoints/last.ckpt``: often enough that a crash costs at most one interval.

``RunCheckpoint`` saves at the end of every epoch, every ``run.checkpoint_every_n_steps`` optimizer steps,
every ``run.checkpoint_every_minutes`` of training (30 by default: what a crash of a multi-day job may cost),
at the step where ``max_steps`` ends training, at the end, and at the first step boundary after

- SIGTERM or Ctrl-C (deepres.training.stop_signals): then it stops the Trainer;
- the scheduler's requeue signal or a near time limit (the ``requeue`` policy, deepres.slurm): then it stops the
  Trainer and, once that step is logged and the loggers have finished, the policy requeues the job.

Every rank checks after every optimizer step (never inside gradient accumulation, where a checkpoint would lose
the accumulated gradients) and the ranks agree with one all-reduce of three flags, so they all save at the same
step even when a signal reached them during different steps, and none saves inside a signal handler (mid-
backward, inside a collective). How the file is written (temporary file, fsync, rename, previous.ckpt kept) is
``deepres.training.checkpoints``; with ``run.async_checkpoint`` the write runs in a background thread after the
tensors are copied, so training waits only for the copy.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy
from typing_extensions import override

from deepres.lightning_compat import (
    epoch_row_due,
    should_update_logs,
    start_epoch_after_a_last_batch_restore,
    step_row_due,
    validates_after_this_batch,
)
from deepres.training import stop_signals
from deepres.training.checkpoints import LAST, CheckpointWriteError, install_checkpoint

_TIME, _REQUEUE, _STOP, _WRITE_FAILED = range(4)
STEP_ROW_KEY = "deepres_step_row"  # the metrics row of the step a checkpoint was saved at (see _write_missing_row)


class RequeuePolicy(Protocol):
    """What a scheduler adds (deepres.slurm.callback.SlurmRequeue): when to requeue, and how."""

    def start(self, trainer: pl.Trainer) -> None: ...

    def due(self) -> bool: ...

    def after_save(self, trainer: pl.Trainer, path: Path) -> None: ...

    signal_name: str
    """The signal that asks for a requeue: RunCheckpoint.stopped_by when training stops for one."""


class RunCheckpoint(ModelCheckpoint):
    """Saves ``<dirpath>/last.ckpt`` on the schedule above. A ModelCheckpoint (with no top-k files of its own),
    so Lightning adds no default checkpoint callback beside it and ``trainer.checkpoint_callback`` finds it; a
    user's own ModelCheckpoint (top-k by a metric) can run beside it."""

    def __init__(self, dirpath: str | Path, *, every_n_steps: int | None = None, every_minutes: float | None = 30.0,
                 requeue: RequeuePolicy | None = None) -> None:
        super().__init__(dirpath=str(dirpath), save_top_k=0, save_last=False)
        self.every_n_steps = every_n_steps or None
        self.every_minutes = every_minutes or None
        self.requeue = requeue
        self.stopped_by: str | None = None  # the signal that stopped training, if one did
        self._saved_step = -1
        self._checked_step = -1
        self._requeue_at_end = False  # training stops for a requeue that on_train_end carries out
        self._last_save = time.monotonic()
        self._write_failure: CheckpointWriteError | None = None
        self._row_due: tuple[int, dict[str, Any]] | None = None  # this step's metrics row, while saving at it
        self._restored_row: dict[str, Any] | None = None

    @property
    def last_path(self) -> Path:
        return Path(self.dirpath) / LAST

    # ---------------------------------------------------------------------------------------------- hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        start_epoch_after_a_last_batch_restore(trainer)
        # After Lightning registered its own SIGTERM handler (it does so just before the loop starts).
        stop_signals.arm()
        self._checked_step = trainer.global_step
        self._saved_step = trainer.global_step if trainer.global_step > 0 else -1  # resumed from that step
        self._last_save = time.monotonic()
        self._write_missing_row(trainer)
        if self.requeue is not None:
            self.requeue.start(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if step == self._checked_step:
            return  # inside gradient accumulation
        self._checked_step = step
        flags = self._agreed_flags(trainer)
        if flags[_WRITE_FAILED]:  # every rank stops here, none waits for the others in a collective
            raise self._write_failure or CheckpointWriteError(
                "rank 0 could not write a checkpoint (its log says why)", stopped_at=step)
        every_n = self.every_n_steps is not None and step % self.every_n_steps == 0
        at_max_steps = 0 < trainer.max_steps <= step
        # At max_steps, save here: in on_train_epoch_end of the cut-short epoch the loops' state (epoch counter
        # advanced, batch counter not reset) would not tell a resume which batches of the epoch were seen.
        if any(flags) or every_n or at_max_steps:
            self._row_due = step_row_due(trainer)  # Lightning writes it after this hook, so after the save
            try:
                self.save(trainer)
            finally:
                self._row_due = None
        # A requeue stops training here and requeues once this step is logged (on_train_end): the requeue makes
        # the scheduler signal every process of the job, the dashboard's service too, so the loggers finish first.
        if flags[_REQUEUE] and self.requeue is not None:
            self._requeue_at_end = True
        if flags[_STOP] or self._requeue_at_end:
            if flags[_STOP]:
                self.stopped_by = stop_signals.pending() or "a stop signal on another rank"
                if trainer.is_global_zero:
                    print(f"deepres: {self.stopped_by}: saved {self.last_path} at step {step}; stopping. "
                          "Resume with --ckpt_path last.", flush=True)
            else:
                self.stopped_by = self.requeue.signal_name
            # Lightning validates and writes step logs whenever should_stop is set: time the kill grace may not
            # have, and metrics rows that an uninterrupted run does not write (the step row with the values of
            # the last logged step: the module computes step metrics only on logging steps). What is due at
            # this step anyway still runs; the Trainer ends here, so nothing else sees these settings.
            if not validates_after_this_batch(trainer):
                trainer.limit_val_batches = 0
            if not should_update_logs(trainer):
                trainer.log_every_n_steps = 0
            trainer.should_stop = True

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.global_step != self._saved_step and not trainer.sanity_checking:
            self._row_due = epoch_row_due(trainer)  # written after this hook too (the skipped-sample counts)
        try:
            self.save(trainer)
        finally:
            self._row_due = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self.save(trainer)
        if self._requeue_at_end:
            self._requeue_at_end = False
            # Everything this attempt trained is logged by now: write it out and end the wandb session while its
            # service still runs (wandb-core exits on SIGTERM without writing what it buffered).
            for logger in trainer.loggers:
                logger.save()
                if hasattr(logger, "finish_before_requeue"):
                    logger.finish_before_requeue()
            stop_signals.ignore_sigterm()  # the requeue's SIGTERM: this attempt has nothing left to save
            self.requeue.after_save(trainer, self.last_path)
            trainer.strategy.barrier("deepres.requeued")  # no rank ends the job step before rank 0 has requeued
        stop_signals.disarm()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stop_signals.disarm()

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._row_due is not None:
            step, values = self._row_due
            checkpoint[STEP_ROW_KEY] = {"global_step": trainer.global_step, "step": step, "values": values}

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._restored_row = checkpoint.get(STEP_ROW_KEY)

    def _write_missing_row(self, trainer: pl.Trainer) -> None:
        """Lightning writes a step's metrics row (and an epoch's, e.g. the skipped-sample counts) after the hook
        that saved the checkpoint at that step. A run that ended in between never wrote it, and its resume starts
        at the next step: a rank killed during a DDP save leaves rank 0 waiting at the save's closing barrier,
        checkpoint written, row not. A checkpoint saved where a row is due therefore carries the row, and the
        resumed run writes it if metrics.csv lacks it (rank 0; every logger, so the dashboard gets it too)."""
        row, self._restored_row = self._restored_row, None
        if not row or not trainer.is_global_zero or row.get("global_step") != trainer.global_step:
            return
        step, values = int(row["step"]), dict(row["values"])
        metrics = Path(trainer.loggers[0].log_dir) / "metrics.csv" if trainer.loggers else None
        if metrics is None or _has_row(metrics, step, [k for k in values if k != "epoch"]):
            return
        for logger in trainer.loggers:
            logger.log_metrics(dict(values), step=step)
            logger.save()

    # ------------------------------------------------------------------------------------------------ save
    def _agreed_flags(self, trainer: pl.Trainer) -> list[bool]:
        failure = getattr(trainer.strategy.checkpoint_io, "failure", None)  # a background write's error
        self._write_failure = failure() if failure is not None else None
        if self._write_failure is not None:
            self._write_failure.stopped_at = trainer.global_step
        local = [
            self.every_minutes is not None and time.monotonic() - self._last_save >= 60 * self.every_minutes,
            self.requeue is not None and self.requeue.due(),
            stop_signals.pending() is not None,
            self._write_failure is not None,
        ]
        if trainer.world_size == 1:
            return local
        flags = torch.tensor(local, dtype=torch.float32, device=trainer.strategy.root_device)
        flags = trainer.strategy.reduce(flags, reduce_op="max")
        return [bool(f) for f in flags.tolist()]

    def save(self, trainer: pl.Trainer) -> Path:
        """Save last.ckpt on every rank (a collective), unless this step is saved already."""
        if trainer.global_step == self._saved_step or trainer.sanity_checking:
            return self.last_path
        path = self.last_path
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            # ZeRO writes a directory, every rank its shard, not through the checkpoint I/O: write it beside
            # last.ckpt and move it into place once every rank is done.
            partial = path.with_name(f".{LAST}.partial")
            if trainer.is_global_zero and partial.exists():
                import shutil

                shutil.rmtree(partial)  # a killed attempt's: its `latest` would make it look complete
            trainer.strategy.barrier("deepres.checkpoint_partial")
            trainer.save_checkpoint(partial, weights_only=False)  # the full training state: it resumes
            if trainer.is_global_zero:
                install_checkpoint(partial, path)
            trainer.strategy.barrier("deepres.checkpoint_installed")
        else:
            trainer.save_checkpoint(path, weights_only=False)  # CheckpointFiles: temporary, fsync, rename
        self._saved_step = trainer.global_step
        self._last_save = time.monotonic()
        return path


def _has_row(path: Path, step: int, keys: list[str]) -> bool:
    """Whether metrics.csv has a row at `step` with any of these values."""
    import csv

    if not path.is_file():
        return False
    with open(path, newline="") as f:
        return any(row.get("step") and int(float(row["step"])) == step and any(row.get(k) for k in keys)
                   for row in csv.DictReader(f))
