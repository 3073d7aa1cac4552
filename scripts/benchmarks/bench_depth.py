"""What a 10,000-block net costs in `deepres fit` beyond its arithmetic (targets: fit step ÷ bare loop ≤ 1.10,
measured diagnostics step ≤ 3 × a plain step).

    .venv/bin/python scripts/benchmarks/bench_depth.py                     # depth 10,000, ~6 min on 2 CPU cores
    .venv/bin/python scripts/benchmarks/bench_depth.py --depth 1000 --steps 20

One process, one torch thread, the default job's model (`highway_mlp`, width 50, gate highway, digits,
batch 64, SGD + Nesterov 0.9, lr 0.05 with a cosine schedule) at --depth hidden layers:
  1. bare PyTorch loop: the same model from `create_model`, torch.optim.SGD (fused, as deepres picks) + LambdaLR, zero_grad / forward /
     cross-entropy / backward / step over the same digits batches — the baseline;
  2. `deepres fit --model.depth D` for --steps steps with its defaults (diagnostics every 50 steps, PerfMonitor,
     CSV logging, run checkpoints; progress bar off), validating every --val-every steps; a callback times every
     step (from one on_train_batch_start to the next), each validation, and one `trainer.save_checkpoint`;
  3. bare loop again (baseline = mean of both, which cancels a linear drift in the machine's load);
  4. `deepres fit` again with `--diagnostics.every_n_steps 3`: each measured step (3, 6, 9, …) against the mean
     of its two neighbours, which run under the same load.
Step 0 (the measured step at init plus the FLOP count) and step 1 are reported separately, not in the medians.
Also printed: model build time, the FLOP count's time, and the validation pass against the arithmetic
(360 digits forward ≈ 360/64 × a third of a step).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import quiet_lightning  # scripts/ is on sys.path

from deepres.training.run_dir import environment

TIMES: dict[str, list] = {}


class StepTimer(pl.Callback):
    """Wall time of every training step, validation pass and one synchronous checkpoint save."""

    def __init__(self):
        self.last: float | None = None
        self.val_start: float | None = None
        self.steps: list[tuple[int, float]] = []
        self.val: list[float] = []
        TIMES["current"] = self

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self.last is not None:
            self.steps.append((trainer.global_step - 1, now - self.last))
        self.last = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch_end = time.perf_counter()

    def on_validation_start(self, trainer, pl_module):
        self.val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        self.val.append(time.perf_counter() - self.val_start)
        self.last = None  # the step after validation would count the validation

    def on_train_end(self, trainer, pl_module):
        if self.last is not None:
            self.steps.append((trainer.global_step - 1, self.batch_end - self.last))
        start = time.perf_counter()
        trainer.save_checkpoint(Path(trainer.default_root_dir) / "bench.ckpt")
        self.save_s = time.perf_counter() - start


def bare_loop(depth: int, steps: int, batches: list) -> list[float]:
    from deepres.models import create_model

    torch.manual_seed(0)
    model = create_model("highway_mlp", depth=depth, width=50, gate="highway", in_features=64, num_classes=10)
    # the fused SGD kernel, as deepres.training.optim picks on CPU: the baseline is a well-written loop
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / 1000)))
    times = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - start)
    return times[1:]  # the first step allocates the optimizer state


def fit(depth: int, steps: int, root: str, name: str, *extra: str) -> StepTimer:
    from deepres.training.cli import main as deepres_main

    argv = ["fit", "--model.depth", str(depth), "--trainer.max_steps", str(steps),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.callbacks+=bench_depth.StepTimer", "--wandb.enabled", "false",
            "--run.root", root, "--run.name", name, *extra]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = deepres_main(argv)
    if code != 0:
        raise RuntimeError(f"deepres {' '.join(argv)} exited {code}:\n{out.getvalue()[-3000:]}")
    import bench_depth  # the Trainer built the callback from this module's import, not from __main__

    return bench_depth.TIMES["current"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=10000)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--val-every", type=int, default=6)
    parser.add_argument("--out-dir", type=Path, default=None, help="also write bench_depth.md and its summary rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    quiet_lightning("deepres")
    env = environment(1)
    print(env, flush=True)
    from deepres.data import DigitsDataModule
    from deepres.models import create_model
    from deepres.observability.diagnostics import count_training_flops

    data = DigitsDataModule()
    data.setup("fit")
    x, y = data.train_set.tensors
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 64 * 8, 64)]
    start = time.perf_counter()
    model = create_model("highway_mlp", depth=args.depth, width=50, in_features=64, num_classes=10)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    flops = count_training_flops(model, x[:4])
    flops_s = time.perf_counter() - start
    del model
    root = tempfile.mkdtemp(prefix="bench_depth_")

    bare_a = bare_loop(args.depth, args.steps // 2 + 1, batches)
    plain = fit(args.depth, args.steps, root, "plain", "--trainer.val_check_interval", str(args.val_every))
    bare_b = bare_loop(args.depth, args.steps // 2 + 1, batches)
    every = 3
    measured = fit(args.depth, max(args.steps, 10), root, "measured", "--diagnostics.every_n_steps", str(every))

    bare = statistics.median(bare_a + bare_b)
    fit_steps = [t for s, t in plain.steps if s >= 2]
    first = {s: t for s, t in plain.steps if s < 2}
    fit_med = statistics.median(fit_steps)
    by_step = dict(measured.steps)
    pairs = [(by_step[s], (by_step[s - 1] + by_step[s + 1]) / 2) for s in by_step
             if s > 0 and s % every == 0 and s - 1 in by_step and s + 1 in by_step]
    diag_ratio = statistics.median(m / p for m, p in pairs)
    step_third = bare / 3 * (len(data.val_set) / 64)  # a forward pass is about a third of a training step

    lines: list[str] = []
    lines.append(f"depth {args.depth}: model build {build_s:.1f} s; FLOP count {flops_s:.2f} s ({flops / 4:.3g} FLOP/sample)")
    lines.append(f"bare loop step: median {bare:.3f} s (first half {statistics.median(bare_a):.3f}, second {statistics.median(bare_b):.3f})")
    lines.append(f"deepres fit step: median {fit_med:.3f} s over steps 2..{args.steps - 1} ({len(fit_steps)} steps); "
          f"step 0 (measured + FLOP count) {first.get(0, float('nan')):.3f} s, step 1 {first.get(1, float('nan')):.3f} s")
    lines.append(f"validation pass (360 digits): {', '.join(f'{v:.2f}' for v in plain.val)} s; arithmetic ≈ {step_third:.2f} s")
    lines.append(f"checkpoint save (trainer.save_checkpoint): {plain.save_s:.2f} s")
    lines.append("measured diagnostics steps vs their neighbours: "
          + ", ".join(f"{m:.2f}/{p:.2f}" for m, p in pairs))
    lines.append(f"RATIO fit step / bare loop step = {fit_med / bare:.3f}  (target <= 1.10)")
    lines.append(f"RATIO measured diagnostics step / plain step = {diag_ratio:.3f}  (target <= 3)")
    fit_ratio, diag = fit_med / bare, diag_ratio
    print("\n".join(lines))
    if args.out_dir is not None:
        from evidence import command_line

        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "bench_depth.md").write_text("\n".join([
            "### 10,000 blocks as a normal size", "", f"`{command_line('bench_depth.py', argv)}` — {env}.", "",
            *[f"- {line}" for line in lines], ""]))
        (args.out_dir / "bench_depth_summary.md").write_text(
            f"| `deepres fit` step ÷ bare PyTorch loop, {args.depth} blocks | {fit_ratio:.3f} | ≤ 1.10 | – | "
            f"{'met' if fit_ratio <= 1.10 else '**not met**'} |\n"
            f"| Measured diagnostics step ÷ plain step, {args.depth} blocks | {diag:.2f} | ≤ 3 | – | "
            f"{'met' if diag <= 3 else '**not met**'} |\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
