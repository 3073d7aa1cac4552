"""A run resumed on another number of processes: 2 → 1 → 4, against the same run on 2 processes in one go.

    python scripts/repro/resume_world_sizes.py --out-dir docs/results     # the default job, ~6 min on 2 cores

The default job (15 epochs of 22 steps, global batch 64, cosine schedule over all 330 steps) runs once on 2 CPU
processes (DDP, 32 samples each) in one go, and once in three parts: 2 processes × 32 until a SIGTERM after step
110, resumed with `--ckpt_path last` on 1 process × 64 until a SIGTERM after step 220, resumed on 4 processes × 16
to the end. A resume on another process count with the same global batch is accepted (deepres.training.resume_check),
and deepres's samplers give rank r the samples perm[r::world] of each epoch's permutation, so every step trains on
the same 64 samples whatever the process count: the two runs differ only in the order in which gradients are summed
(within a rank, then across ranks), i.e. in float32 rounding. Written: the largest difference of the training loss
at any step and of the final parameters, and val/acc1 after each epoch of both runs.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
from deepres.training.run_dir import environment  # noqa: E402

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", "--wandb.enabled", "false",
         "--trainer.log_every_n_steps", "1", "--trainer.accelerator", "cpu"]


def processes(n: int, global_batch: int) -> list[str]:
    strategy = ["--trainer.strategy", "ddp"] if n > 1 else []
    return ["--trainer.devices", str(n), *strategy, "--data.batch_size", str(global_batch // n)]


def fit(root: Path, name: str, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    cmd = [sys.executable, "-m", "deepres", "fit", "--run.root", str(root), "--run.name", name, *QUIET, *args]
    print("+", " ".join(cmd[3:]), flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode not in (0, 143):  # 143: stopped by the SIGTERM this script asked for, after saving
        raise SystemExit(f"deepres fit failed ({done.returncode}):\n{done.stderr[-3000:]}")


def stop_after(step: int) -> list[str]:
    return ["--trainer.callbacks+=_signal_at_step.SignalAtStep", f"--trainer.callbacks.step={step}"]


def read_metrics(run_dir: Path) -> tuple[dict[int, float], dict[int, tuple[int, float, float]]]:
    """train/loss by step; (step, val/loss, val/acc1) by epoch."""
    loss, val = {}, {}
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                loss[int(row["step"])] = float(row["train/loss"])
            if row.get("val/loss"):
                val[int(float(row["epoch"]))] = (int(row["step"]), float(row["val/loss"]), float(row["val/acc1"]))
    return loss, val


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if v.is_floating_point()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/resume_world_sizes"))
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--stops", type=int, nargs=2, default=[110, 220], help="the two steps to stop after")
    parser.add_argument("--out-dir", type=Path, default=None, help="write <out-dir>/resume_world_sizes.md")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, stops after steps 8 and 16")
    args = parser.parse_args(argv)
    more = ["--trainer.max_epochs", "2"] if args.quick else []
    if args.quick:
        args.stops = [8, 16]
    machine = environment(1)
    g = args.global_batch
    fit(args.root, "whole", *processes(2, g), *more)
    fit(args.root, "split", *processes(2, g), *more, *stop_after(args.stops[0]))
    fit(args.root, "split", *processes(1, g), *more, *stop_after(args.stops[1]), "--ckpt_path", "last")
    fit(args.root, "split", *processes(4, g), *more, "--ckpt_path", "last")

    (whole_loss, whole_val), (split_loss, split_val) = read_metrics(args.root / "whole"), read_metrics(args.root / "split")
    assert sorted(whole_loss) == sorted(split_loss) and sorted(whole_val) == sorted(split_val), "different steps logged"
    first = max(abs(whole_loss[s] - split_loss[s]) for s in whole_loss if s < args.stops[0])
    a, b = weights(args.root / "whole"), weights(args.root / "split")
    param_diff = max((a[k] - b[k]).abs().max().item() for k in a)

    def trained_on(step: int) -> str:
        return "2" if step < args.stops[0] else "1" if step < args.stops[1] else "4"

    rows = [f"| {e} | {trained_on(whole_val[e][0])} | {whole_val[e][1]:.7f} | {split_val[e][1]:.7f} | "
            f"{abs(whole_val[e][1] - split_val[e][1]):.1e} | {whole_val[e][2]:.4f} / {split_val[e][2]:.4f} |"
            for e in sorted(whole_val)]
    val_diff = max(abs(whole_val[e][1] - split_val[e][1]) for e in whole_val)
    last = max(whole_loss)
    lines = ["# Resume on another number of processes: 2 → 1 → 4", "",
             f"`python scripts/repro/resume_world_sizes.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
             f"Machine: {machine}.", "",
             f"Global batch {g}: 2 processes × {g // 2} for steps 0–{args.stops[0] - 1}, resumed on 1 × {g} for steps "
             f"{args.stops[0]}–{args.stops[1] - 1}, resumed on 4 × {g // 4} for steps {args.stops[1]}–{last}; against "
             f"2 × {g // 2} in one go. Validation loss over the whole validation set after each epoch (every rank's "
             "samples):", "",
             "| epoch | processes at its end (resumed run) | val/loss in one go | val/loss resumed | \\|Δ\\| | val/acc1 |",
             "| ---: | ---: | ---: | ---: | ---: | --- |", *rows, "",
             f"- largest val/loss difference: **{val_diff:.1e}**; final parameters: largest difference **{param_diff:.1e}**",
             f"- train/loss before the first resume (2 processes in both runs): largest difference {first:.1e}. After "
             "it the logged train/loss is not comparable step by step: under DDP it is rank 0's own share of the batch.",
             "- Tolerance: the runs sum the same gradients in another order (within a rank, then across ranks), so they "
             "agree to float32 rounding, amplified a little by training; no step trains on other samples.", ""]
    print("\n".join(lines))
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "resume_world_sizes.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
