"""How long a checkpoint save stalls training: synchronous vs background writes, in one run.

    python scripts/benchmarks/bench_checkpoint.py                 # resnet18 (11.7 M parameters), 32x32 images, batch 32
                                                                  # about 1 min on one core: 2 x 61 steps of ~0.16 s
    python scripts/benchmarks/bench_checkpoint.py --steps 40 --every 10

A real Lightning fit with deepres's RunCheckpoint saving last.ckpt every `--every` steps, once with the write on
the training thread (CheckpointFiles) and once from a background thread (BackgroundCheckpointFiles, what
`deepres fit` uses: the tensors are copied to CPU memory on the training thread, then serialised, written and
fsynced beside training). The
stall per save is the time of a step that saves minus the median step that does not. Printed: the stall in ms and
in % of a step, and what it costs at deepres's default interval (every epoch end and every 30 minutes).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import command_line  # noqa: E402

from deepres.training.run_dir import environment  # noqa: E402


def measure(mode: str, args: argparse.Namespace, root: Path) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from deepres.data import SyntheticDataModule
    from deepres.training import Classifier
    from deepres.training.checkpoints import BackgroundCheckpointFiles, CheckpointFiles
    from deepres.training.run_checkpoint import RunCheckpoint

    class StepClock(Callback):
        """Wall time from one step's end to the next one's: the step and whatever the callbacks did."""

        def __init__(self):
            self.ends: list[float] = []

        def on_train_batch_end(self, *_):
            self.ends.append(time.perf_counter())

    clock = StepClock()
    io = BackgroundCheckpointFiles() if mode == "background" else CheckpointFiles()
    # Lightning runs checkpoint callbacks after all others: the save at the end of step k lands in the time the
    # clock measures from its end of step k to its end of step k + 1.
    saver = RunCheckpoint(root / mode, every_n_steps=args.every, every_minutes=None)
    model = Classifier(arch=args.arch, num_classes=10, input_shape=(3, args.image_size, args.image_size))
    data = SyntheticDataModule(image_size=args.image_size, batch_size=args.batch_size,
                               train_size=args.batch_size * (args.steps + 1), val_size=args.batch_size)
    trainer = L.Trainer(max_steps=args.steps, callbacks=[saver, clock], plugins=[io], logger=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        accelerator="cpu", devices=1, use_distributed_sampler=False)
    trainer.fit(model, data)
    steps = [b - a for a, b in itertools.pairwise(clock.ends)]  # steps[i]: from the end of step i+1 to i+2
    saving = {i for i in range(len(steps)) if (i + 1) % args.every == 0}
    plain = statistics.median(s for i, s in enumerate(steps) if i not in saving and i > 0)
    stalls = [steps[i] - plain for i in sorted(saving)]
    size = (root / mode / "last.ckpt").stat().st_size
    params = sum(p.numel() for p in model.parameters())
    return {"mode": mode, "params": params, "checkpoint_mb": size / 2**20, "step_ms": plain * 1e3,
            "stall_ms": statistics.mean(stalls) * 1e3, "saves": len(stalls)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=61)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"# {command_line('bench_checkpoint.py', argv)}\n# {environment(args.threads)}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(mode, args, Path(tmp)) for mode in ("synchronous", "background")]
    for r in rows:
        print(f"{r['mode']:>12}: {r['params'] / 1e6:.1f} M parameters, checkpoint {r['checkpoint_mb']:.0f} MiB, "
              f"step {r['step_ms']:.0f} ms, stall per save {r['stall_ms']:.0f} ms = "
              f"{100 * r['stall_ms'] / r['step_ms']:.0f} % of a step ({r['saves']} saves)")
    sync, background = rows
    print(f"background / synchronous stall: {background['stall_ms'] / sync['stall_ms']:.2f}")
    per_30_min = 30 * 60e3 / background["step_ms"]
    print(f"at the default interval (30 min = {per_30_min:.0f} steps of this size): "
          f"{100 * background['stall_ms'] / (per_30_min * background['step_ms']):.3f} % of training time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
