"""A small deepres run for the pipeline tests, run as a real script (one command per rank).

    python tests/_pipe.py --out DIR [--strategy pipeline|auto] [--devices N] [--stages S] [--schedule 1f1b]
                          [--microbatches M] [--batch-size B] [--epochs E] [--net mlp|bn|mhc] [--resume CKPT]
                          [--precision bf16-mixed] [--clip C] [--checkpointing K]
    python tests/_pipe.py --out DIR --reference --replicas R --microbatches M ...   # the micro-batch reference

The net is deepres's own Classifier (highway_mlp with 6 blocks, the same on 3 mHC streams, or a BatchNorm
CIFAR ResNet with 3 blocks) on 80 fixed random rows (5 steps of 16 a epoch), trained with plain SGD with
momentum at a constant learning rate. Rank 0 writes DIR/last.ckpt (every epoch end) and DIR/result.json (global step, the
logged train/loss values, the validation loss). `--reference` trains the same net in one process without
Lightning, one micro-batch at a time, as GPipe computes it: BatchNorm statistics per micro-batch, the
gradients averaged over the micro-batches and the replicas, the running statistics of replica 0.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import TensorDataset

from deepres.data.base import DeepresDataModule, ResumableSampler
from deepres.errors import ConfigError
from deepres.strategies import resolve_strategy
from deepres.training import Classifier, MemoryConfig, OptimizerConfig, ScheduleConfig
from deepres.training.optim import build_optimizer

ROWS, VAL_ROWS, CLASSES = 80, 24, 4
NETS: dict[str, dict[str, Any]] = {
    "mlp": {"arch": "highway_mlp", "input_shape": (12,), "arch_args": {"depth": 7, "width": 16}},
    "bn": {"arch": "cifar_resnet", "input_shape": (3, 6, 6), "arch_args": {"depth": 8, "zero_init_last": False}},
    "mhc": {"arch": "highway_mlp", "input_shape": (12,), "arch_args": {"depth": 7, "width": 16, "gate": "mhc",
                                                                      "streams": 3}},
}


class FixedData(DeepresDataModule):
    def __init__(self, batch_size: int, input_shape: tuple[int, ...]):
        super().__init__(batch_size, seed=0)
        self.num_classes, self.input_shape = CLASSES, input_shape

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(1)
        self.train_set = TensorDataset(torch.randn(ROWS, *self.input_shape, generator=g),
                                       torch.randint(0, CLASSES, (ROWS,), generator=g))
        self.val_set = TensorDataset(torch.randn(VAL_ROWS, *self.input_shape, generator=g),
                                     torch.randint(0, CLASSES, (VAL_ROWS,), generator=g))


def make_model(net: str) -> Classifier:
    torch.manual_seed(0)
    spec = NETS[net]
    return Classifier(arch=spec["arch"], arch_args=dict(spec["arch_args"]), num_classes=CLASSES,
                      input_shape=spec["input_shape"],
                      optim=OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=False),
                      schedule=ScheduleConfig(name="constant"))


class Record(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.val_loss: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get("val/loss")
        self.val_loss = None if value is None else float(value)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--strategy", default="pipeline")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--stages", type=int, default=None)
    p.add_argument("--schedule", default="1f1b")
    p.add_argument("--virtual-stages", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=None)
    p.add_argument("--balance", default="params")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--net", default="mlp", choices=sorted(NETS))
    p.add_argument("--resume", default=None)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--clip", type=float, default=None)
    p.add_argument("--checkpointing", type=int, default=0)
    p.add_argument("--reference", action="store_true")
    p.add_argument("--replicas", type=int, default=1)
    return p.parse_args(argv)


def reference(args: argparse.Namespace) -> int:
    """GPipe's arithmetic in one process: see the module docstring."""
    model = make_model(args.net)
    net = model.net
    data = FixedData(args.batch_size, NETS[args.net]["input_shape"])
    data.setup()
    opt = build_optimizer(net, OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=False))
    samplers = [ResumableSampler(ROWS, shuffle=True, seed=0, rank=r, world=args.replicas)
                for r in range(args.replicas)]
    x_all, y_all = data.train_set.tensors
    for epoch in range(args.epochs):
        orders = []
        for s in samplers:
            s.set_epoch(epoch)
            orders.append(list(s))
        for step in range(len(orders[0]) // args.batch_size):
            opt.zero_grad(set_to_none=True)
            for r, order in enumerate(orders):
                replica = net if r == 0 else copy.deepcopy(net)  # replica r's BatchNorm statistics are not kept
                rows = torch.tensor(order[step * args.batch_size:(step + 1) * args.batch_size])
                for chunk in rows.tensor_split(args.microbatches):
                    loss = F.cross_entropy(replica(x_all[chunk]), y_all[chunk])
                    (loss / (args.microbatches * args.replicas)).backward()
                if r:
                    for p, q in zip(net.parameters(), replica.parameters(), strict=True):
                        p.grad = q.grad if p.grad is None else p.grad + q.grad
            opt.step()
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, args.out / "reference.ckpt")
    return 0


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    args = parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reference:
        return reference(args)
    model = make_model(args.net)
    if args.checkpointing:
        model.memory = MemoryConfig(activation_checkpointing=args.checkpointing)
    strategy: Any = args.strategy
    if args.strategy == "pipeline":
        from deepres.strategies import PipelineStrategy

        try:
            strategy = PipelineStrategy(stages=args.stages, microbatches=args.microbatches, schedule=args.schedule,
                                        virtual_stages=args.virtual_stages, balance=args.balance)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    trainer_args: dict[str, Any] = {"accelerator": "cpu", "devices": args.devices, "strategy": strategy,
                                    "precision": args.precision, "gradient_clip_val": args.clip}
    try:
        trainer_args["strategy"] = resolve_strategy(trainer_args, batch_size=args.batch_size, model=model)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    record = Record()
    trainer = pl.Trainer(**trainer_args, max_epochs=args.epochs, logger=False, use_distributed_sampler=False,
                         callbacks=[ModelCheckpoint(dirpath=args.out, save_last=True, save_top_k=0), record],
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=args.out,
                         num_sanity_val_steps=1)
    trainer.fit(model, datamodule=FixedData(args.batch_size, NETS[args.net]["input_shape"]), ckpt_path=args.resume)
    if trainer.is_global_zero:
        result = {"world_size": trainer.world_size, "global_step": trainer.global_step, "losses": record.losses,
                  "val_loss": record.val_loss,
                  "ranges": getattr(trainer.strategy, "block_ranges", None)}
        (args.out / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
