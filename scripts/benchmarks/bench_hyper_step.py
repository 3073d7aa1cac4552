"""Training-step time of the multi-stream members against `gated`, side by side in one process.

    OMP_NUM_THREADS=1 python scripts/benchmarks/bench_hyper_step.py                 # mhc (n = 4) ÷ gated, 100 blocks
    OMP_NUM_THREADS=1 python scripts/benchmarks/bench_hyper_step.py --gates mhc mhc:iters=1 mhc:static mhc_lite hc

The nets are those of the depth sweep (scripts/repro/sweep_hyper_depth.py): `highway_mlp` with --blocks
blocks of width --width on 64 inputs, the multi-stream gates on --streams streams (dynamic, mHC's 20
Sinkhorn iterations unless a variant says otherwise: `mhc:iters=1`, `mhc:static`). One training step is
forward, backward and the default job's optimizer step (SGD + Nesterov, deepres.training.optim) on one
batch of --batch random rows. Every round steps each net once, the baseline `gated` first in odd rounds
and last in even ones, so that a change in the machine's load or a position effect hits all alike; the
first --warmup rounds are left out. Printed: each net's median step time and the median over the rounds
of its step time ÷ the baseline's in the same round (the speed target: mhc ÷ gated <= 1.5 on one CPU
thread), with the spread (25th-75th percentile) of that ratio.

Runtime: about a minute with the defaults on one CPU thread (33 rounds; at 100 blocks a step of gated takes
about 0.1 s and one of mhc about 0.17 s at width 50; docs/RESULTS.md, "Step time, side by side").
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from deepres.models import create_model
from deepres.models.hyper import HYPER_GATES
from deepres.training.config import OptimizerConfig
from deepres.training.optim import build_optimizer

BASELINE = "gated"


def build(spec: str, blocks: int, width: int, streams: int) -> torch.nn.Module:
    """`gate` or `gate:option`, option one of iters=K (Sinkhorn iterations), static (no dynamic mixing)."""
    gate, _, option = spec.partition(":")
    extra = {"streams": streams} if gate in HYPER_GATES else {}
    if option == "static":
        extra["dynamic"] = False
    elif option.startswith("iters="):
        extra["sinkhorn_iters"] = int(option.removeprefix("iters="))
    elif option:
        raise SystemExit(f"unknown variant {spec!r}: use gate, gate:iters=K or gate:static")
    return create_model("highway_mlp", depth=blocks + 1, width=width, in_features=64, num_classes=10, gate=gate,
                        **extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gates", nargs="+", default=["mhc"], help="nets timed against gated")
    p.add_argument("--blocks", type=int, default=100)
    p.add_argument("--width", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [BASELINE, *args.gates]
    nets = {name: build(name, args.blocks, args.width, args.streams) for name in names}
    opts = {name: build_optimizer(net, OptimizerConfig()) for name, net in nets.items()}
    x, y = torch.randn(args.batch, 64), torch.randint(0, 10, (args.batch,))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.warmup + args.rounds):
        for name in names if r % 2 else names[1:] + names[:1]:
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(nets[name](x), y)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
    print(f"# torch {torch.__version__}, {args.threads} thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"load average {os.getloadavg()[0]:.1f}; {args.blocks} blocks, width {args.width}, batch {args.batch}, "
          f"{args.streams} streams, {args.rounds} rounds after {args.warmup} of warm-up")
    base = times[BASELINE]
    print(f"{BASELINE:>14}: {statistics.median(base) * 1e3:8.1f} ms per step (baseline)")
    for name in args.gates:
        ratios = sorted(t / b for t, b in zip(times[name], base, strict=True))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        print(f"{name:>14}: {statistics.median(times[name]) * 1e3:8.1f} ms per step; {name} ÷ {BASELINE} = "
              f"{statistics.median(ratios):.2f} (25-75 %: {q1:.2f}-{q3:.2f})")


if __name__ == "__main__":
    main()
