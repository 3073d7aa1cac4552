"""Model cost: deepres `resnet50` vs torchvision `resnet50` (same weights), and Highway-ResNet-50 vs ResNet-50.

    .venv/bin/python scripts/benchmarks/bench_model_cost.py            # batch 8 at 224², 8 trials: ~3 min on one quiet core
    .venv/bin/python scripts/benchmarks/bench_model_cost.py --quick    # smoke test: 64², batch 2, 2 trials

One training forward + backward (cross-entropy, train mode, fp32, NCHW) of
  torchvision.models.resnet50(),
  deepres.models.create_model("resnet50") with torchvision's weights copied in (the parameter and
    buffer order is the same: state_dict values are zipped after checking every shape, and the two
    nets' eval-mode outputs are checked to agree),
  deepres.models.create_model("resnet50", gate="highway") (Highway-ResNet-50: a grouped 1x1 conv
    transform gate per block, carry 1 − t).
Every trial times one step of each net, in alternating order (tv, deepres, highway, then the
reverse), after untimed warm-up steps; ratios are taken within a trial (the steps are seconds
apart, so they share the machine's load) and summarised by their median. FLOPs per step are
counted with torch.utils.flop_counter.FlopCounterMode on the forward pass. Writes model_cost.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deepres.models import create_model, load_torchvision_weights

TARGETS = {"deepres ResNet-50 ÷ torchvision ResNet-50": 1.00, "Highway-ResNet-50 ÷ deepres ResNet-50": 1.15}
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import add_standard_arguments, label_trial_axes, save_figure  # noqa: E402  (scripts/ is on sys.path)

from deepres.training.run_dir import environment  # noqa: E402


def build(image_size: int) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    ours = create_model("resnet50")
    load_torchvision_weights(ours, tv.state_dict())  # by name, strict about shapes
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        diff = (tv.eval()(x) - ours.eval()(x)).abs().max().item()
    if diff > 1e-4:
        raise RuntimeError(f"deepres resnet50 with torchvision's weights differs from torchvision by {diff}")
    print(f"same weights copied; eval outputs agree to {diff:.1e}", flush=True)
    return {"torchvision": tv.train(), "deepres": ours.train(), "highway": create_model("resnet50", gate="highway").train()}


def step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    net.zero_grad(set_to_none=True)
    F.cross_entropy(net(x), y).backward()


def timed_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    step(net, x, y)
    return time.perf_counter() - start


def forward_flops_per_image(net: nn.Module, x: torch.Tensor) -> float:
    """Forward only: torch's FlopCounterMode overcounts the weight gradient of grouped convolutions
    (the Highway gates) by the number of groups (fixed upstream in pytorch/pytorch#183405)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x)
    return counter.get_total_flops() / len(x)


def verdict(ratio: float, ratios: list[float], target: float) -> str:
    if ratio <= target:
        return "**met**"
    return "**not met** (within noise: some trials ≤ target)" if min(ratios) <= target else "**not met**"


def write_table(path: Path, summary: dict, flops: dict[str, float], times: dict[str, list[float]], header: str) -> None:
    lines = [
        "### Model cost: deepres ResNet-50 vs torchvision, Highway-ResNet-50 vs ResNet-50",
        "",
        header,
        "",
        "| net | s per forward + backward | forward GFLOP per image (paper: ResNet-50 4.1 G multiply-adds = 8.2) |",
        "| --- | ---: | ---: |",
    ]
    for net, ts in times.items():
        lines.append(f"| {net} | {statistics.mean(ts):.3f} ± {statistics.stdev(ts) if len(ts) > 1 else 0:.3f} | "
                     f"{flops[net] / 1e9:.2f} |")
    lines += ["", "| ratio (median of per-trial ratios, range) | measured | forward FLOP ratio | target | verdict |",
              "| --- | ---: | ---: | ---: | --- |"]
    for name, s in summary.items():
        spread = f"{min(s['ratios']):.3f}–{max(s['ratios']):.3f}"
        lines.append(f"| {name} | {s['ratio']:.3f} ({spread}) | {s['flop_ratio']:.3f} | ≤ {TARGETS[name]:.2f} | "
                     f"{verdict(s['ratio'], s['ratios'], TARGETS[name])} |")
    lines += ["", "![model cost](results/model_cost.png)", ""]
    path.write_text("\n".join(lines))


def write_summary(path: Path, summary: dict) -> None:
    """This result's rows of the summary table in docs/RESULTS.md (result | measured | target | paper | verdict)."""
    path.write_text("".join(
        f"| Model cost, {name}, s per forward + backward | {s['ratio']:.3f} (forward FLOPs {s['flop_ratio']:.3f}) | "
        f"≤ {TARGETS[name]:.2f} | — | {verdict(s['ratio'], s['ratios'], TARGETS[name])} |\n"
        for name, s in summary.items()))


def plot(path: Path, times: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for net, ts in times.items():
        ax.plot(range(1, len(ts) + 1), ts, "o-", label=net)
    ax.set_xticks(range(1, len(next(iter(times.values()))) + 1))
    label_trial_axes(ax, "trial (one step of each net per trial, alternating order)", "s per forward + backward",
                     "ResNet-50 training step cost")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per net")
    parser.add_argument("--trials", type=int, default=8, help="timed steps per net, alternating")
    add_standard_arguments(parser, "64² images, batch 2, 2 trials")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.image_size, args.warmup, args.trials = 2, 64, 1, 2
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(env, flush=True)
    start = time.perf_counter()
    nets = build(args.image_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 1000, (args.batch_size,), generator=g)
    flops = {name: forward_flops_per_image(net, x) for name, net in nets.items()}
    for net in nets.values():
        for _ in range(args.warmup):
            step(net, x, y)
    times: dict[str, list[float]] = {name: [] for name in nets}
    for trial in range(args.trials):
        order = list(nets) if trial % 2 == 0 else list(reversed(nets))
        for name in order:
            times[name].append(timed_step(nets[name], x, y))
        print(f"trial {trial + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in nets), flush=True)
    pairs = {"deepres ResNet-50 ÷ torchvision ResNet-50": ("deepres", "torchvision"),
             "Highway-ResNet-50 ÷ deepres ResNet-50": ("highway", "deepres")}
    summary = {}
    for label, (a, b) in pairs.items():
        ratios = [ta / tb for ta, tb in zip(times[a], times[b], strict=True)]
        summary[label] = {"ratio": statistics.median(ratios), "ratios": ratios, "flop_ratio": flops[a] / flops[b]}
        print(f"{label}: {summary[label]['ratio']:.3f} (median of {len(ratios)}; FLOP ratio "
              f"{summary[label]['flop_ratio']:.3f}; target <= {TARGETS[label]})", flush=True)
    seconds = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "model_cost.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", *(f"{n}_s" for n in nets)])
        for trial in range(args.trials):
            writer.writerow([trial + 1, *(f"{times[n][trial]:.4f}" for n in nets)])
    command = " ".join(["python", "scripts/benchmarks/bench_model_cost.py", *(argv if argv is not None else sys.argv[1:])])
    header = (f"`{command}` — batch {args.batch_size} at {args.image_size}², fp32, train mode; {args.trials} "
              f"timed steps per net (trials alternate the order) after {args.warmup} warm-up steps; "
              f"{seconds / 60:.1f} min. {env}.")
    write_table(args.out_dir / "model_cost.md", summary, flops, times, header)
    write_summary(args.out_dir / "model_cost_summary.md", summary)
    plot(args.out_dir / "model_cost.png", times)
    print(f"wrote {args.out_dir}/model_cost.csv, model_cost.md, model_cost.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
