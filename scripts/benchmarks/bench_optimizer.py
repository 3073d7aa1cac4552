"""What torch's fused optimizer kernels save per step, against the per-tensor loop, in one run.

    python scripts/benchmarks/bench_optimizer.py            # the default job's net, 1 thread: about 30 s
    python scripts/benchmarks/bench_optimizer.py --arch highway_mlp --depth 1000 --repeats 5

deepres builds its optimisers with ``fused=True`` whenever every parameter is a float tensor on CPU or CUDA
(deepres.training.optim.implementation): one kernel per parameter group instead of a Python loop over tensors.
This times ``optimizer.step()`` alone, on the default job's parameters and param groups (deepres's own
``build_optimizer``, weight decay split as in training) with fixed random gradients, for each optimiser deepres
offers: the loop (``foreach=False``, torch's choice on CPU) against the fused kernel, interleaved A B A B with
warm-up steps dropped. Printed and written: the median ms per step of each and the ratio loop ÷ fused.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import command_line  # noqa: E402

from deepres.training.run_dir import environment  # noqa: E402

OPTIMIZERS = ("sgd", "adamw", "adam")


def time_steps(optimizer, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def measure(name: str, args: argparse.Namespace) -> dict:
    import torch

    from deepres.models import create_model
    from deepres.training.optim import OptimizerConfig, build_optimizer

    torch.manual_seed(0)
    model = create_model(args.arch, num_classes=10, in_features=64, **({"depth": args.depth} if args.depth else {}))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    cfg = OptimizerConfig(name=name)
    fused, loop = build_optimizer(model, cfg, fused=True), build_optimizer(model, cfg, fused=False)
    assert all(g.get("fused") for g in fused.param_groups), "the fused kernel was not chosen"
    for group in loop.param_groups:
        group["foreach"] = False  # torch's choice on CPU: the per-tensor loop
    samples = {"fused": [], "loop": []}
    for _ in range(args.repeats):  # A B A B: drift of the machine's load hits both alike
        for label, opt in (("loop", loop), ("fused", fused)):
            samples[label] += time_steps(opt, args.warmup + args.steps)[args.warmup:]
    ms = {label: statistics.median(times) * 1e3 for label, times in samples.items()}
    tensors = sum(1 for _ in model.parameters())
    return {"optimizer": name, "tensors": tensors, "params": sum(p.numel() for p in model.parameters()),
            "loop_ms": ms["loop"], "fused_ms": ms["fused"], "ratio": ms["loop"] / ms["fused"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="highway_mlp")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default: the architecture's, 100 layers)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per repeat and implementation")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--out-dir", type=Path, default=None, help="write <out-dir>/bench_optimizer.md")
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 steps, one repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 1
    import torch

    torch.set_num_threads(args.threads)
    machine = environment(args.threads)
    rows = [measure(name, args) for name in args.optimizers]
    lines = ["| optimiser | parameter tensors | loop (ms / step) | fused (ms / step) | loop ÷ fused |",
             "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['optimizer']} | {r['tensors']} | {r['loop_ms']:.2f} | {r['fused_ms']:.2f} | {r['ratio']:.2f} |"
              for r in rows]
    print("\n".join(lines))
    if args.out_dir is not None:
        text = ["# Fused optimiser kernels against the per-tensor loop", "",
                f"`{command_line('bench_optimizer.py', argv)}`: `optimizer.step()` alone on "
                f"`{args.arch}`'s parameters ({rows[0]['params']:,} in {rows[0]['tensors']} tensors) with fixed "
                f"gradients, median of {args.repeats} × {args.steps} steps each, interleaved A B A B.", "",
                f"Machine: {machine}.", "", *lines, ""]
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "bench_optimizer.md").write_text("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
