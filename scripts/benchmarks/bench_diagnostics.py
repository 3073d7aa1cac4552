"""Overhead of deepres's depth diagnostics on a 1000-block Highway MLP (target: < 5 % of step time).

    .venv/bin/python scripts/benchmarks/bench_diagnostics.py                  # defaults below, ~10 min on 2 CPU cores
    .venv/bin/python scripts/benchmarks/bench_diagnostics.py --windows 10

One Lightning fit of highway_mlp(depth=1001, width=50) on random 784-feature inputs, batch 128,
with DepthDiagnostics and PerfMonitor at their default interval (50 steps). After a warm-up
interval, the run is cut into windows of exactly one interval. The diagnostics are switched on
or off for whole windows in the order off, on, on, off, off, on, … (ABBA, which cancels a linear
drift in the machine's load). An "on" window therefore holds exactly one measured step plus 49
plain ones, the rate a real run pays. Alternating within one process, rather than across separate
runs, keeps the neighbours' load on a shared machine from swamping a difference of a few percent.

On a busy shared machine even ABBA windows drift by ±10 %, so a second phase measures the cost of a
measured step directly: the diagnostics run every 2nd step, and each measured step is compared with
the mean of its two plain neighbours (which see the same load). The extra cost per measured step,
divided by 50 plain steps, is the overhead at the default interval.

The script prints hardware, versions, per-window wall and CPU times, mean ± std per side, the
window overhead (mean on / mean off − 1, and the median over adjacent on/off pairs), and the
paired-step estimate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import quiet_lightning  # scripts/ is on sys.path
from lightning.pytorch.loggers import CSVLogger

from deepres.models import create_model
from deepres.observability.diagnostics import DepthDiagnostics, PerfMonitor
from deepres.observability.plain_classifier import PlainClassifier
from deepres.training.run_dir import environment

HOOKS = ("setup", "on_train_start", "on_train_batch_start", "on_before_backward", "on_before_optimizer_step",
         "on_train_batch_end", "on_train_end", "on_validation_start", "on_validation_end")


class Windows(pl.Callback):
    """Switches `callbacks` on or off per window of `interval` steps and times each window.

    Must come first in the trainer's callbacks so each step starts with the on/off decision."""

    def __init__(self, callbacks: list[pl.Callback], interval: int, windows_per_side: int, pairs: int):
        self.callbacks, self.interval = callbacks, interval
        pattern = [False, True, True, False]  # ABBA
        self.plan = [pattern[i % 4] for i in range(2 * windows_per_side)]
        self.active = True  # during warm-up (the first interval) the diagnostics run, as after any start
        self.times: list[tuple[bool, float, float]] = []
        self.start: tuple[float, float] | None = None
        self.on_now = True
        self.paired_start = interval * (2 * windows_per_side + 1)  # first step of the paired phase
        self.paired_end = self.paired_start + 2 * pairs + 1
        self.step_times: list[tuple[int, float, float]] = []  # (step, wall, CPU) in the paired phase
        for name in HOOKS:
            setattr(self, name, self._forward(name))

    def _forward(self, name: str):
        def hook(trainer, *args, **kwargs):
            if name == "on_train_batch_start":
                self._window_boundary(trainer)
            if self.active or name in ("setup", "on_train_start", "on_train_end"):
                for callback in self.callbacks:
                    getattr(callback, name)(trainer, *args, **kwargs)
        return hook

    def _window_boundary(self, trainer) -> None:
        step = trainer.global_step
        now = (time.perf_counter(), time.process_time())
        if step <= self.paired_start and step % self.interval == 0:
            if self.start is not None:
                self.times.append((self.on_now, now[0] - self.start[0], now[1] - self.start[1]))
                on, wall, cpu = self.times[-1]
                print(f"  window {len(self.times):2d} diagnostics {'on ' if on else 'off'}: wall "
                      f"{wall / self.interval * 1e3:7.1f} ms/step, CPU {cpu / self.interval * 1e3:7.1f} ms/step",
                      flush=True)
            window = step // self.interval - 1  # window 0 starts after the warm-up interval
            if 0 <= window < len(self.plan):
                self.on_now = self.active = self.plan[window]
                self.start = now
            else:
                self.start, self.active = None, True
        if self.paired_start <= step <= self.paired_end:
            self._paired_step(step, now)

    def _paired_step(self, step: int, now: tuple[float, float]) -> None:
        if step == self.paired_start:  # from here on the diagnostics measure every 2nd (even) step
            for callback in self.callbacks:
                callback.every_n_steps = 2
        elif self.start is not None:
            self.step_times.append((step - 1, now[0] - self.start[0], now[1] - self.start[1]))
        self.start, self.active = now, True


def summarise(times: list[tuple[bool, float, float]], interval: int) -> None:
    for k, clock in ((1, "wall"), (2, "CPU")):
        means = {}
        for on in (False, True):
            ts = [t[k] / interval for t in times if t[0] == on]
            means[on] = statistics.mean(ts)
            spread = statistics.stdev(ts) if len(ts) > 1 else 0.0
            print(f"{clock:4s} diagnostics {'on ' if on else 'off'}: {means[on] * 1e3:.1f} ± {spread * 1e3:.1f} "
                  f"ms/step (n={len(ts)} windows of {interval} steps)")
        # ABBA: windows (0,1), (2,3), … are adjacent on/off pairs
        pairs = [(a, b) if a[0] else (b, a) for a, b in zip(times[::2], times[1::2], strict=False)]
        ratios = [on_t[k] / off_t[k] for on_t, off_t in pairs]
        print(f"{clock:4s} overhead: {(means[True] / means[False] - 1) * 100:+.2f} % of step time (means); "
              f"median over {len(ratios)} adjacent pairs {(statistics.median(ratios) - 1) * 100:+.2f} % "
              f"[{', '.join(f'{(r - 1) * 100:+.1f}' for r in ratios)}]; target < 5 %")


def summarise_pairs(step_times: list[tuple[int, float, float]], interval: int) -> None:
    """Extra cost of a measured (even) step over the mean of its plain neighbours, per 50 plain steps."""
    by_step = {step: (wall, cpu) for step, wall, cpu in step_times}
    for k, clock in ((0, "wall"), (1, "CPU")):
        extra, plain = [], []
        for step in by_step:
            if step % 2 == 0 and step - 1 in by_step and step + 1 in by_step:
                neighbours = (by_step[step - 1][k] + by_step[step + 1][k]) / 2
                extra.append(by_step[step][k] - neighbours)
                plain.append(neighbours)
        if not extra:
            return
        cost, step_time = statistics.median(extra), statistics.median(plain)
        print(f"{clock:4s} paired steps: a measured step costs {cost * 1e3:+.1f} ms over its plain neighbours "
              f"(median of {len(extra)}; plain step {step_time * 1e3:.1f} ms) -> overhead at every {interval} steps "
              f"{cost / (interval * step_time) * 100:+.2f} % of step time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=1001, help="hidden layers (1 plain + depth-1 blocks)")
    parser.add_argument("--width", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--windows", type=int, default=6, help="timed windows per side")
    parser.add_argument("--pairs", type=int, default=15, help="measured steps in the paired phase")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    diagnostics = [DepthDiagnostics(), PerfMonitor()]  # default intervals
    interval = diagnostics[0].every_n_steps
    print(environment(torch.get_num_threads()))
    print(f"highway_mlp depth={args.depth} width={args.width} batch={args.batch_size}; diagnostics every "
          f"{interval} steps; {args.windows} windows per side after a {interval}-step warm-up, then "
          f"{args.pairs} measured steps between plain ones")
    windows = Windows(diagnostics, interval, args.windows, args.pairs)
    torch.manual_seed(0)
    n = args.batch_size * 64
    data = torch.utils.data.TensorDataset(torch.randn(n, 784), torch.randint(0, 10, (n,)))
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=windows.paired_end + 1,
            logger=CSVLogger(run_dir, name="", version=""), callbacks=[windows], enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50, default_root_dir=run_dir,
        )
        net = create_model("highway_mlp", depth=args.depth, width=args.width, in_features=784)
        trainer.fit(PlainClassifier(net, lr=0.01, momentum=0.9), loader)
    summarise(windows.times, interval)
    summarise_pairs(windows.step_times, interval)


if __name__ == "__main__":
    quiet_lightning()
    main()
