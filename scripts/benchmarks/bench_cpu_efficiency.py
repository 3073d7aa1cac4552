"""CPU efficiency: achieved training FLOP/s of `deepres fit` jobs vs the fp32 matmul peak of the same cores.

    .venv/bin/python scripts/benchmarks/bench_cpu_efficiency.py            # 3 jobs x 3 trials: ~4 min on one quiet core
    .venv/bin/python scripts/benchmarks/bench_cpu_efficiency.py --quick    # smoke test

Jobs, each trained by `deepres fit` on in-memory tensors (the harness of scripts/benchmarks/bench_overhead.py:
the clock is read once per step, warm-up, setup and validation excluded):
  the default job (100-layer highway_mlp, width 50, on the digits, batch 64),
  resnet20_cifar on 3x32x32 images, batch 64,
  resnet50 on 3x224x224 images, batch 8.
FLOPs per step = one forward + backward of the same network on one batch counted by
torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions, 2 FLOPs per multiply-add;
elementwise ops, norms and the optimiser are not counted, as in MFU). The peak is what the same
process gets from a large fp32 torch.mm (n = 2048, best of 3) with the same number of threads,
measured before every trial of every job, so it sees the same load; efficiency = achieved ÷ the
median peak. Writes cpu_efficiency.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from bench_overhead import InMemoryData, environment, make_tensors, time_deepres  # scripts/ is on sys.path
from evidence import add_standard_arguments, quiet_lightning, save_figure, write_results_csv
from torch.utils.flop_counter import FlopCounterMode

from deepres.models import create_model

TARGET = 0.5  # at least half the matmul peak
JOBS = {
    # name: (deepres fit arguments, create_model arguments, sample shape, batch)
    "default job (highway_mlp depth 100, batch 64)": ([], ("highway_mlp", {"in_features": 64}), (64,), 64),
    "resnet20_cifar (32², batch 64)": (["--model.arch", "resnet20_cifar"], ("resnet20_cifar", {"in_chans": 3}),
                                       (3, 32, 32), 64),
    "resnet50 (224², batch 8)": (["--model.arch", "resnet50"], ("resnet50", {"in_chans": 3}), (3, 224, 224), 8),
}


def matmul_peak(n: int, reps: int = 3) -> float:
    """FLOP/s of the fastest of `reps` n x n fp32 matrix products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: page in, pick the kernel
    best = min(_seconds(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def training_flops(arch: str, overrides: dict, x: torch.Tensor, y: torch.Tensor) -> int:
    torch.manual_seed(0)
    net = create_model(arch, num_classes=10, **overrides).train()
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(net(x), y).backward()
    return counter.get_total_flops()


def write_table(path: Path, summary: dict[str, dict], peaks: list[float], header: str) -> None:
    peak = statistics.median(peaks)
    lines = [
        "### CPU efficiency: achieved training FLOP/s vs the fp32 matmul peak",
        "",
        header,
        "",
        f"fp32 `torch.mm` peak on these cores: **{peak / 1e9:.1f} GFLOP/s** (median of {len(peaks)} measurements "
        f"interleaved with the jobs, range {min(peaks) / 1e9:.1f}–{max(peaks) / 1e9:.1f}).",
        "",
        "| job (`deepres fit`) | GFLOP per step | s per step | achieved GFLOP/s | ÷ peak | target | verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for job, s in summary.items():
        eff = s["flops"] / s["seconds"] / peak
        verdict = "**met**" if eff >= TARGET else "**not met**"
        lines.append(f"| {job} | {s['flops'] / 1e9:.3g} | {s['seconds']:.4f} ± {s['std']:.4f} | "
                     f"{s['flops'] / s['seconds'] / 1e9:.1f} | {eff:.2f} | ≥ {TARGET} | {verdict} |")
    lines += ["", "![CPU efficiency](results/cpu_efficiency.png)", ""]
    path.write_text("\n".join(lines))


def write_summary(path: Path, summary: dict[str, dict], peaks: list[float]) -> None:
    """This result's rows of the summary table in docs/RESULTS.md (result | measured | target | paper | verdict)."""
    peak = statistics.median(peaks)
    path.write_text("".join(
        f"| CPU efficiency, {job}: training FLOP/s ÷ fp32 matmul peak | {s['flops'] / s['seconds'] / peak:.2f} | "
        f"≥ {TARGET} | A100 ResNet-50 best trainers: ≈ 0.19 of bf16 peak ([science.md](science.md#compute-costs)) | "
        f"{'met' if s['flops'] / s['seconds'] / peak >= TARGET else '**not met**'} |\n" for job, s in summary.items()))


def plot(path: Path, summary: dict[str, dict], peaks: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = statistics.median(peaks)
    names = list(summary)
    effs = [summary[n]["flops"] / summary[n]["seconds"] / peak for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh(range(len(names)), effs, color="tab:blue")
    ax.axvline(TARGET, color="tab:red", ls="--", label=f"target {TARGET}")
    ax.axvline(1.0, color="grey", ls=":", label=f"fp32 matmul peak ({peak / 1e9:.0f} GFLOP/s)")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xlabel("achieved training FLOP/s ÷ matmul peak")
    ax.set_xlim(0, 1.05)
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of each trial")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per trial")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--matmul-size", type=int, default=2048)
    add_standard_arguments(parser, "the default job only, tiny", threads="torch intra-op threads (jobs and peak alike)")
    args = parser.parse_args(argv)
    jobs = JOBS
    if args.quick:
        args.warmup, args.steps, args.trials, args.matmul_size = 1, 2, 1, 512
        jobs = {k: v for k, v in JOBS.items() if k.startswith("default")}
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(env, flush=True)
    start = time.perf_counter()
    summary: dict[str, dict] = {}
    rows, peaks = [], []
    with tempfile.TemporaryDirectory(prefix="bench_cpu_efficiency_") as root:
        for job, (fit_args, (arch, overrides), shape, batch) in jobs.items():
            timing = argparse.Namespace(warmup=args.warmup, steps=args.steps, batch_size=batch)
            InMemoryData.tensors = make_tensors(shape, (args.warmup + args.steps + 2) * batch)
            x, y = (t[:batch] for t in InMemoryData.tensors)
            flops = training_flops(arch, overrides, x, y)
            per_step = []
            for trial in range(args.trials):
                peaks.append(matmul_peak(args.matmul_size))
                per_step.append(time_deepres(fit_args, timing, root) / args.steps)
                rows.append({"job": job, "trial": trial + 1, "s_per_step": per_step[-1], "flops_per_step": flops,
                             "matmul_peak_flops": peaks[-1]})
                print(f"{job}: trial {trial + 1}: {per_step[-1]:.4f} s/step, {flops / per_step[-1] / 1e9:.1f} GFLOP/s; "
                      f"matmul peak {peaks[-1] / 1e9:.1f} GFLOP/s", flush=True)
            summary[job] = {"flops": flops, "seconds": statistics.mean(per_step),
                            "std": statistics.stdev(per_step) if len(per_step) > 1 else 0.0}
    peaks.append(matmul_peak(args.matmul_size))
    seconds = time.perf_counter() - start
    for job, s in summary.items():
        print(f"{job}: {s['flops'] / s['seconds'] / statistics.median(peaks):.3f} of the matmul peak (target >= {TARGET})")
    command = write_results_csv(args.out_dir, "cpu_efficiency", rows, "bench_cpu_efficiency.py", argv)
    header = (f"`{command}` — {args.trials} trials per job, each {args.steps} timed steps after {args.warmup} "
              f"warm-up steps, fp32; {seconds / 60:.1f} min. {env}.")
    write_table(args.out_dir / "cpu_efficiency.md", summary, peaks, header)
    write_summary(args.out_dir / "cpu_efficiency_summary.md", summary, peaks)
    plot(args.out_dir / "cpu_efficiency.png", summary, peaks)
    print(f"wrote {args.out_dir}/cpu_efficiency.csv, cpu_efficiency.md, cpu_efficiency.png")
    return 0


if __name__ == "__main__":
    quiet_lightning()
    sys.exit(main())
