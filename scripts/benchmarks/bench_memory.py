"""Peak activation memory and step time of very deep nets: stored activations, activation checkpointing
(every block, √L, selective) and reversible blocks, side by side.

    python scripts/benchmarks/bench_memory.py --models highway_mlp              # ~8 min on 2 busy cores
    python scripts/benchmarks/bench_memory.py --models preact_resnet1001_cifar  # ~10 min

Each measurement runs in a fresh process: build the model and optimizer, run warm-up steps (so
gradients and optimizer state exist), reset the kernel's peak-RSS counter (/proc/self/clear_refs),
run timed steps, and report activation memory = peak RSS during the steps − RSS before them
(with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave RSS at once); step time
from a separate process with the default allocator.
Modes: no checkpointing ("none"), every block (k = 1), k = √L, selective checkpointing of every
block (keep matmul/conv outputs, recompute the rest), and the reversible form of the same net
("reversible"), against that reversible architecture with its activations stored ("reversible-stored":
the same blocks through ordinary autograd). F and B, the forward and backward times of "none", give
the floor (2F + B)/(F + B) of any scheme that recomputes one forward. Baselines are named in every ratio.
Targets: √L step time ≤ 1.35 × none or the floor; selective ≤ 1.15 × none at ≤ 0.5 of its memory;
reversible ≤ 1.5 × reversible-stored, and its activation memory at 10,000 blocks ≤ 1.2 × that at 1,000.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

MODELS = {
    # name: (create_model kwargs, input shape without batch, default batch)
    "preact_resnet1001_cifar": ({"num_classes": 10}, (3, 32, 32), 16),
    "highway_mlp": ({"depth": 1001, "width": 50, "in_features": 784}, (784,), 1024),
}


def worker(model: str, overrides: dict, batch: int, every: str, steps: int, warmup: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from deepres.models import create_model
    from deepres.parallelize.activation_checkpoint import apply_activation_checkpointing

    torch.manual_seed(0)
    kwargs, shape, _ = MODELS[model]
    reversible = every.startswith("reversible")
    net = create_model(model, **{**kwargs, **overrides, **({"reversible": True} if reversible else {})})
    if reversible:
        net.blocks.store_activations = every == "reversible-stored"
    k = apply_activation_checkpointing(net, int(every) if every.isdigit() else every) \
        if every != "none" and not reversible else 0
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
    times, fwd, bwd = [], [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    med = len(times) // 2
    return {"model": model, "blocks": len(net.blocks), "every": every, "k": k, "batch": batch,
            "activation_bytes": peak_rss_bytes() - before, "step_s": sorted(times)[med],
            "forward_s": sorted(fwd)[med], "backward_s": sorted(bwd)[med]}


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


MODES = ("none", "1", "sqrt", "selective", "reversible", "reversible-stored")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--trials", type=int, default=2, help="alternating rounds over the modes")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads per measurement")
    p.add_argument("--batch", type=int, help="override the per-model batch size")
    p.add_argument("--no-depth-scaling", dest="depth_scaling", action="store_false",
                   help="skip the highway_mlp memory-vs-depth runs (2000 and 10,000 blocks)")
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
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for _ in range(args.trials):
            for mode in results:  # alternate the sides to cancel drift
                results[mode].append(run(model, {}, batch, mode, args.steps, args.warmup, args.threads))
        keys = ("activation_bytes", "step_s", "forward_s", "backward_s")
        med = {m: {key: sorted(r[key] for r in rs)[len(rs) // 2] for key in keys} for m, rs in results.items()}
        L = results["none"][0]["blocks"]
        F, B = med["none"]["forward_s"], med["none"]["backward_s"]
        floor = (2 * F + B) / (F + B)
        print(f"\n## {model}: {L} blocks, batch {batch}; none: forward F = {F:.3f} s, backward B = {B:.3f} s, "
              f"recompute floor (2F + B)/(F + B) = {floor:.3f}")
        print("| mode | k | activation memory (MB) | step (s) | memory / none | time / none |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for m, rs in results.items():
            mem, t = med[m]["activation_bytes"], med[m]["step_s"]
            print(f"| {m} | {rs[0]['k']} | {mem / 2**20:.0f} | {t:.3f} | "
                  f"{mem / med['none']['activation_bytes']:.3f} | {t / med['none']['step_s']:.3f} |")

        def ratio(a: str, b: str, key: str, med=med) -> float:
            return med[a][key] / med[b][key]

        print(f"RATIO {model} sqrt-checkpointing activation memory / no checkpointing = "
              f"{ratio('sqrt', 'none', 'activation_bytes'):.3f} (target <= 0.15)")
        print(f"RATIO {model} sqrt-checkpointing step time / no checkpointing = {ratio('sqrt', 'none', 'step_s'):.3f} "
              f"(target <= 1.35 or the measured floor {floor:.3f})")
        print(f"RATIO {model} selective activation memory / no checkpointing = "
              f"{ratio('selective', 'none', 'activation_bytes'):.3f} (target <= 0.5)")
        print(f"RATIO {model} selective step time / no checkpointing = {ratio('selective', 'none', 'step_s'):.3f} "
              f"(target <= 1.15)")
        print(f"RATIO {model} reversible step time / reversible-stored = "
              f"{ratio('reversible', 'reversible-stored', 'step_s'):.3f} (target <= 1.5)")
        print(f"RATIO {model} reversible activation memory / reversible-stored = "
              f"{ratio('reversible', 'reversible-stored', 'activation_bytes'):.3f}")
        print(f"RATIO {model} reversible activation memory / no checkpointing = "
              f"{ratio('reversible', 'none', 'activation_bytes'):.3f}")
    if "highway_mlp" in args.models and args.depth_scaling:
        batch = args.batch or MODELS["highway_mlp"][2]
        growth = {}
        for mode, depths in (("sqrt", (1001, 2001)), ("reversible", (1001, 10001))):
            for depth in depths:
                rs = [run("highway_mlp", {"depth": depth}, batch, mode, 0, args.warmup, args.threads)
                      for _ in range(args.trials)]
                growth[mode, depth] = sorted(r["activation_bytes"] for r in rs)[len(rs) // 2]
        print(f"\nRATIO highway_mlp sqrt-checkpointing activation memory 2000 blocks / 1000 blocks = "
              f"{growth['sqrt', 2001] / growth['sqrt', 1001]:.3f} (target <= 1.5; sqrt(2) = 1.414, linear = 2)")
        print(f"RATIO highway_mlp reversible activation memory 10,000 blocks / 1,000 blocks = "
              f"{growth['reversible', 10001] / growth['reversible', 1001]:.3f} "
              f"({growth['reversible', 1001] / 2**20:.0f} -> {growth['reversible', 10001] / 2**20:.0f} MB; "
              f"target <= 1.2, linear = 10)")

if __name__ == "__main__":
    main()
