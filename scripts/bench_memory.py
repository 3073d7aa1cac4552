"""Peak activation memory and step time of very deep nets with and without activation checkpointing.

    python scripts/bench_memory.py                       # both models, all modes (~10 min on 2 cores)
    python scripts/bench_memory.py --models highway_mlp  # the quick one

Each measurement runs in a fresh process: build the model and optimizer, run warm-up steps (so
gradients and optimizer state exist), reset the kernel's peak-RSS counter (/proc/self/clear_refs),
run timed steps, and report activation memory = peak RSS during the steps − RSS before them
(with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave RSS at once); step time
from a separate process with the default allocator.
Modes: no checkpointing, every block (k = 1), and k = √L. Baselines are named in every ratio.
Targets: with √L, activation memory ≤ 0.15 × none at ≤ 1.35 × the step time; activation
memory at 2000 blocks ≤ 1.5 × that at 1000.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

MODELS = {
    # name: (create_model kwargs, input shape without batch, default batch)
    "preact_resnet1001_cifar": ({"num_classes": 10}, (3, 32, 32), 16),
    "highway_mlp": ({"depth": 1001, "width": 50, "in_features": 784}, (784,), 1024),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS


def worker(model: str, overrides: dict, batch: int, every: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from deepres.activation_checkpoint import apply_activation_checkpointing
    from deepres.models import create_model

    torch.manual_seed(0)
    kwargs, shape, _ = MODELS[model]
    net = create_model(model, **{**kwargs, **overrides})
    k = apply_activation_checkpointing(net, int(every) if every.isdigit() else every) if every != "none" else 0
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))

    def step():
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    before = rss_bytes()
    reset_peak_rss()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"model": model, "blocks": len(net.blocks), "every": every, "k": k, "batch": batch,
            "activation_bytes": peak_rss_bytes() - before, "step_s": sorted(times)[len(times) // 2]}


def run(model: str, overrides: dict, batch: int, every: str, steps: int, warmup: int, threads: int) -> dict:
    """Memory from one process with glibc's mmap threshold fixed at 64 KiB (every freed block leaves
    RSS at once; by default the threshold adapts upward and freed activations stay resident); step
    time from another with the default allocator (the fixed threshold slows every step)."""
    cmd = [sys.executable, __file__, "--worker"]
    args = [model, overrides, batch, every, 1, warmup, threads]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    mem = json.loads(subprocess.run(cmd + [json.dumps(args)], capture_output=True, text=True, check=True,
                                    env=env).stdout.strip().splitlines()[-1])
    if steps == 0:
        return mem
    args[4] = steps
    timed = json.loads(subprocess.run(cmd + [json.dumps(args)], capture_output=True, text=True,
                                      check=True).stdout.strip().splitlines()[-1])
    return {**timed, "activation_bytes": mem["activation_bytes"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--trials", type=int, default=2, help="alternating rounds over the modes")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads per measurement")
    p.add_argument("--batch", type=int, help="override the per-model batch size")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return

    import torch

    from deepres.training.run_dir import cpu_model

    print(f"# {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {args.threads}, load average {os.getloadavg()[0]:.1f}, {args.trials} alternating trials x {args.steps} steps "
          f"(median step), {args.warmup} warm-up step(s) excluded")
    for model in args.models:
        batch = args.batch or MODELS[model][2]
        results: dict[str, list[dict]] = {m: [] for m in ("none", "1", "sqrt")}
        for _ in range(args.trials):
            for mode in results:  # alternate the sides to cancel drift
                results[mode].append(run(model, {}, batch, mode, args.steps, args.warmup, args.threads))
        med = {m: {key: sorted(r[key] for r in rs)[len(rs) // 2] for key in ("activation_bytes", "step_s")}
               for m, rs in results.items()}
        L = results["none"][0]["blocks"]
        print(f"\n## {model}: {L} blocks, batch {batch}")
        print("| checkpointing | k | activation memory (MB) | step (s) | memory / none | time / none |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for m, rs in results.items():
            mem, t = med[m]["activation_bytes"], med[m]["step_s"]
            print(f"| {m} | {rs[0]['k']} | {mem / 2**20:.0f} | {t:.3f} | "
                  f"{mem / med['none']['activation_bytes']:.3f} | {t / med['none']['step_s']:.3f} |")
        print(f"RATIO {model} sqrt-checkpointing activation memory / no checkpointing = "
              f"{med['sqrt']['activation_bytes'] / med['none']['activation_bytes']:.3f} (target <= 0.15)")
        print(f"RATIO {model} sqrt-checkpointing step time / no checkpointing = "
              f"{med['sqrt']['step_s'] / med['none']['step_s']:.3f} (target <= 1.35)")
    if "highway_mlp" in args.models:
        batch = args.batch or MODELS["highway_mlp"][2]
        growth = {}
        for depth in (1001, 2001):
            rs = [run("highway_mlp", {"depth": depth}, batch, "sqrt", 0, args.warmup, args.threads) for _ in range(args.trials)]
            growth[depth] = sorted(r["activation_bytes"] for r in rs)[len(rs) // 2]
        print(f"\nRATIO highway_mlp sqrt-checkpointing activation memory 2000 blocks / 1000 blocks = "
              f"{growth[2001] / growth[1001]:.3f} (target <= 1.5; sqrt(2) = 1.414, linear = 2)")


if __name__ == "__main__":
    main()
