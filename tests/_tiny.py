"""A tiny classifier and a one-file training run for the strategy tests, run as a real script.

    python tests/_tiny.py --out DIR [--accelerator cpu] [--strategy ddp] [--devices 2] [--batch-size 8] [--epochs 1]
                          [--precision bf16-mixed] [--resume CKPT]

Lightning's launcher for `ddp` and `deepspeed_*` starts the other ranks by re-running this command, as it
would a user's training script, so the tests exercise the real multi-process path. The run resolves the
strategy with deepres.strategies.resolve_strategy, as the training CLI does, and rank 0 writes:
    DIR/last.ckpt     the checkpoint (a directory under DeepSpeed)
    DIR/result.json   backend, world size, global step, losses, dtypes, DeepSpeed config
A refused configuration prints the message and exits 2, before any other process starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from deepres.errors import ConfigError
from deepres.strategies import resolve_strategy

NUM_SAMPLES = 32  # an epoch is 2 steps of 2 processes x 8 rows, or of 1 process x 16 rows
LR = 0.1
MOMENTUM = 0.9


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(NUM_SAMPLES, 8, generator=generator)
    labels = torch.randint(0, 3, (NUM_SAMPLES,), generator=generator)
    return TensorDataset(features, labels)


class TinyClassifier(pl.LightningModule):
    """Two linear layers; SGD with momentum, so a resumed run also needs the optimizer state back."""

    def __init__(self, batch_size: int = 8) -> None:
        super().__init__()
        self.batch_size = batch_size
        torch.manual_seed(0)  # the same initial weights in every process and every run
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
        self.losses: list[float] = []
        self.dtypes: dict[str, str] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        features, labels = batch
        logits = self.net(features)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        self.losses.append(loss.item())
        self.dtypes = {"param": str(self.net[0].weight.dtype), "logits": str(logits.dtype)}
        return loss

    def train_dataloader(self) -> DataLoader:
        # Lightning would wrap a plain loader in a *shuffling* DistributedSampler; in order, rank r of a
        # step gets rows r, r + world, ..., so the step covers the same rows as one process's doubled batch.
        data = dataset()
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accumulate-grad-batches", type=int, default=1)
    parser.add_argument("--gradient-clip-val", type=float, default=None)
    parser.add_argument("--resume", default=None)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    args = parse(argv)
    trainer_kwargs: dict[str, Any] = {
        "accelerator": args.accelerator,
        "devices": args.devices,
        "strategy": args.strategy,
        "precision": args.precision,
        "accumulate_grad_batches": args.accumulate_grad_batches,
        "gradient_clip_val": args.gradient_clip_val,
    }
    try:
        trainer_kwargs["strategy"] = resolve_strategy(trainer_kwargs, batch_size=args.batch_size)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    trainer = pl.Trainer(
        **trainer_kwargs,
        # Epochs, not max_steps: resuming a run that max_steps stopped at an epoch's end replays a batch
        # (Lightning issue #19617).
        max_epochs=args.epochs,
        logger=False,
        # last.ckpt written by the callback at the end of each epoch, as a deepres run writes it.
        callbacks=[ModelCheckpoint(dirpath=args.out, save_last=True, save_top_k=0)],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.out,
    )
    model = TinyClassifier(args.batch_size)
    trainer.fit(model, ckpt_path=args.resume)
    if trainer.is_global_zero:
        config = getattr(trainer.strategy, "config", None)
        result = {
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "losses": model.losses,
            "dtypes": model.dtypes,
            "deepspeed_config": config,
        }
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
