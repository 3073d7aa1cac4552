"""Samples a data module skipped (corrupt images, bad labels, broken or stalled shards), counted per reason.

A data module that skips samples says so with a ``skipped_samples`` property: {reason: samples skipped on this
rank since it was built} (deepres.data.shards). ``SkippedSampleCounts`` sums them over the ranks at the end of
every epoch and logs ``data/skipped/<reason>`` (so they are in metrics.csv, the wandb run and finished.json),
keeps the totals in checkpoints (a resumed run goes on counting from them) and prints one line at the end of
training when anything was skipped. Data modules without the property cost nothing.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from deepres.data.shard_stream import SKIP_REASONS
from deepres.lightning_compat import at_the_epochs_last_batch
from deepres.training import stop_signals


class SkippedSampleCounts(Callback):
    def __init__(self) -> None:
        self.before: dict[str, int] = {}  # totals over all ranks up to the checkpoint this run resumed from

    def _local(self, trainer: pl.Trainer) -> dict[str, int] | None:
        return getattr(trainer.datamodule, "skipped_samples", None) if trainer.datamodule is not None else None

    def totals(self, trainer: pl.Trainer) -> dict[str, int] | None:
        """{reason: samples skipped over all ranks and all attempts}; a collective under several processes."""
        local = self._local(trainer)
        if local is None:
            return None
        counts = torch.tensor([float(local.get(reason, 0)) for reason in SKIP_REASONS],
                              device=trainer.strategy.root_device)
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return {reason: self.before.get(reason, 0) + int(n) for reason, n in zip(SKIP_REASONS, counts.tolist(), strict=True)}

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An epoch a stop signal cut short ends here too: its row would be one the run in one go lacks (the
        # resumed run logs the counts, the ones up to the stop included, at the epoch's real end).
        stopped = stop_signals.stopped_training(trainer)
        if stopped and not at_the_epochs_last_batch(trainer):
            return
        totals = self.totals(trainer)
        if totals is not None:
            pl_module.log_dict({f"data/skipped/{reason}": float(n) for reason, n in totals.items()},
                               on_step=False, on_epoch=True, sync_dist=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        totals = self.totals(trainer)
        if totals and sum(totals.values()) and trainer.is_global_zero:
            parts = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in totals.items() if n)
            print(f"deepres: skipped {sum(totals.values())} corrupt samples ({parts}); "
                  "data/skipped/* in metrics.csv", flush=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"before": dict(self.before)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.before = {k: int(v) for k, v in state_dict.get("before", {}).items()}

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Lightning took state_dict() just before; the totals up to now replace it. Every rank builds the
        # checkpoint (rank 0 writes it), so the sum over the ranks is taken here, on all of them.
        totals = self.totals(trainer)
        if totals is not None:
            checkpoint.setdefault("callbacks", {})[self.state_key] = {"before": totals}
