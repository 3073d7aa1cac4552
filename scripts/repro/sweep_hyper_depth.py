"""Multi-stream residuals from 10 to 10,000 blocks on the digits job: highway, gated, hc, mhc, mhc_lite.

    python scripts/repro/sweep_hyper_depth.py                          # depths 10 100 1000 10000, 100 steps each
    python scripts/repro/sweep_hyper_depth.py --quick                  # depths 10 100, 20 steps: a minute
    python scripts/repro/sweep_hyper_depth.py --depths 10000 --steps 30
    python scripts/repro/sweep_hyper_depth.py --step-time              # mhc (n = 4) ÷ gated, side by side
    python scripts/repro/sweep_hyper_depth.py --report-only            # rewrite the .md from the stored rows

For every depth (blocks, smallest first) and gate: `highway_mlp` with depth = blocks + 1, width 50, the
multi-stream gates at --streams streams (dynamic, mHC's 20 Sinkhorn iterations), trained in process with
the default job's optimizer and schedule (SGD + Nesterov 0.9, lr 0.05, cosine over --steps steps,
batch 64, deepres.training.optim) on the digits (deepres.data.DigitsDataModule), one seed. Recorded:
the composite gain of ∏H^res (deepres.models.hyper.composite_gain; dynamic mixings on a validation
batch) at init and after training, validation accuracy, the mean training loss of the last 10 steps,
the loss curve and the median step time. Each finished run is appended to
docs/results/hyper_depth.jsonl and docs/results/hyper_depth.md is rewritten from all rows, so an
interrupted sweep keeps what it measured and later invocations (deeper depths) add to it.

--step-time: the step time of mhc at --streams streams and of gated at the same depth (--step-depth
blocks) and batch, measured in one process with the runs interleaved (median of --repeats steps each),
printed as the ratio mhc ÷ gated (target on CPU: <= 1.5).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from deepres.data import DigitsDataModule
from deepres.models import cpu_kernels, create_model
from deepres.models.hyper import HYPER_GATES, composite_gain, hyper_blocks, residual_matrices
from deepres.training.config import OptimizerConfig, ScheduleConfig
from deepres.training.optim import build_optimizer, lr_lambda

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
GATES = ("highway", "gated", "hc", "mhc", "mhc_lite")


def build(gate: str, blocks: int, streams: int, width: int = 50, **options) -> torch.nn.Module:
    extra = {"streams": streams, **options} if gate in HYPER_GATES else {}
    return create_model("highway_mlp", depth=blocks + 1, width=width, in_features=64, num_classes=10, gate=gate,
                        **extra)


def gain(net: torch.nn.Module, x: torch.Tensor) -> dict[str, float] | None:
    if not hyper_blocks(net.blocks):
        return None
    with torch.no_grad():
        streams = net.stem(x)
    g = composite_gain(residual_matrices(net.blocks, streams))
    return {k: v for k, v in g.summary().items()}


def stream_spread(net: torch.nn.Module, x: torch.Tensor) -> float | None:
    """max |H_i − mean_j H_j| / max |H| at the stack's output: how far the n streams, identical copies at
    the stem, have moved apart (0: the net is a one-stream net n times over)."""
    if not hyper_blocks(net.blocks):
        return None
    with torch.no_grad():
        h = net.blocks(net.stem(x))
    return float((h - h.mean(-1, keepdim=True)).abs().max() / h.abs().max())


def batches(loader):
    while True:
        yield from loader


def run(gate: str, blocks: int, steps: int, streams: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    dm = DigitsDataModule(batch_size=64, layout="flat", seed=seed)
    dm.setup()
    val_x = torch.stack([dm.val_set[i][0] for i in range(len(dm.val_set))])
    val_y = torch.tensor([int(dm.val_set[i][1]) for i in range(len(dm.val_set))])
    net = build(gate, blocks, streams)
    at_init = gain(net, val_x[:64])
    opt = build_optimizer(net, OptimizerConfig())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ScheduleConfig(), total_steps=steps))
    losses, times = [], []
    data = batches(dm.train_dataloader())
    net.train()
    for _ in range(steps):
        x, y = next(data)
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    net.eval()
    with torch.no_grad():
        acc = float((net(val_x).argmax(1) == val_y).float().mean())
    return {
        "gate": gate, "blocks": blocks, "streams": streams if gate in HYPER_GATES else 1, "steps": steps,
        "val_acc": acc, "final_loss": statistics.fmean(losses[-10:]), "step_s": statistics.median(times),
        "gain_init": at_init, "gain_trained": gain(net, val_x[:64]), "losses": losses,
        "stream_spread": stream_spread(net, val_x[:64]),
        "threads": torch.get_num_threads(), "load": os.getloadavg()[0],
    }


def _fmt_gain(g: dict | None) -> str:
    if g is None:
        return "–"
    return (f"{g['composite/max_row_sum']:.4g} / {g['composite/max_col_sum']:.4g} / "
            f"{g['composite/min_col_sum']:.4g} / {g['composite/max_abs_log_col_sum']:.2g}")


def _fmt_spread(spread: float | None) -> str:
    return "–" if spread is None else f"{spread:.1e}"


def _curve(losses: list[float]) -> str:
    marks = sorted({0, len(losses) // 4, len(losses) // 2, 3 * len(losses) // 4, len(losses) - 1})
    return " → ".join("nan" if not math.isfinite(losses[i]) else f"{losses[i]:.2f}" for i in marks)


def read_rows(path: Path) -> list[dict]:
    """The sweep's rows in `path` (JSON lines), a re-run replacing the earlier row of the same point."""
    stored = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return list({(r["blocks"], r["gate"], r["steps"]): r for r in stored}.values())


def read_timings(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_markdown(rows: list[dict], path: Path, step_time: list[dict]) -> None:
    lines = [
        "### Multi-stream residuals: hc, mhc and mhc_lite from 10 to 10,000 blocks (digits)",
        "",
        "Written by `scripts/repro/sweep_hyper_depth.py`. `highway_mlp`, width 50, one plain layer then the blocks; "
        "the default job's optimizer (SGD + Nesterov 0.9, lr 0.05, cosine to 0 over the run's steps, batch 64), "
        "one seed, CPU, one thread. Multi-stream gates: n streams, dynamic mixings, mHC's 20 Sinkhorn iterations, "
        "H^post at init 2σ(−ln L − 1) (the depth-aware default).",
        "",
        "Composite gain of ∏H^res over all blocks (worst of 16 validation samples): max |row sum| / "
        "max |column sum| / min column sum / max |log column sum|. Stream spread after training: "
        "max |H_i − mean_j H_j| / max |H| at the last block (the stem's copies start identical; – where not "
        "recorded).",
        "",
        "| blocks | gate | n | steps | val acc | loss (last 10) | step (s) | gain at init | gain after training "
        "| stream spread | loss curve (first → ¼ → ½ → ¾ → last) |",
        "|---:|---|---:|---:|---:|---:|---:|---|---|---:|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["blocks"], GATES.index(r["gate"]) if r["gate"] in GATES else 99)):
        lines.append(
            f"| {r['blocks']:,} | {r['gate']} | {r['streams']} | {r['steps']} | {100 * r['val_acc']:.1f} % | "
            f"{r['final_loss']:.3g} | {r['step_s']:.3f} | {_fmt_gain(r['gain_init'])} | "
            f"{_fmt_gain(r['gain_trained'])} | {_fmt_spread(r.get('stream_spread'))} | {_curve(r['losses'])} |")
    if step_time:
        lines += ["", "#### Step time, side by side", "",
                  "`--step-time`: n = 4, one process, the nets' steps interleaved, median of the timed steps; "
                  "Sinkhorn: deepres's compiled CPU kernel or PyTorch ops (rows from before the kernel existed); "
                  "load = the machine's 1-minute load average at the end (2 cores).", "",
                  "| blocks | width | batch | Sinkhorn | gated (s) | mhc (s) | **mhc ÷ gated** "
                  "| mhc, 1 Sinkhorn iteration ÷ gated | mhc_lite ÷ gated | load |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {s['blocks']:,} | {s.get('width', 50)} | {s['batch']} | "
                  f"{'kernel' if s.get('kernels') else 'PyTorch ops'} | {s['gated_s']:.4f} | {s['mhc_s']:.4f} | "
                  f"{s['ratio']:.2f} | {s['mhc_1_iter_s'] / s['gated_s']:.2f} | {s['mhc_lite_s'] / s['gated_s']:.2f} | "
                  f"{s['load']:.1f} |" for s in step_time]
    figure = path.with_suffix(".png")
    write_figure(rows, figure)
    write_summary(rows, step_time, path.with_name(path.stem + "_summary.md"))
    # pasted into docs/RESULTS.md (scripts/tools/make_results.sh --assemble): the figure relative to docs/
    lines[2:2] = [f"![training loss by depth](results/{figure.name})", ""]
    path.write_text("\n".join(lines) + "\n")


def write_summary(rows: list[dict], step_time: list[dict], path: Path) -> None:
    """The rows of docs/RESULTS.md's summary table: the targets of the multi-stream members."""
    by = {(r["blocks"], r["gate"]): r for r in rows}
    out = []
    mhc = by.get((1000, "mhc"))
    if mhc and mhc["gain_trained"]:
        g = mhc["gain_trained"]
        ok = g["composite/max_col_sum"] <= 2 and g["composite/min_col_sum"] >= 0.5
        out.append(f"| mhc (n = 4), 1,000 blocks, trained: composite max / min column sum of ∏H^res | "
                   f"{g['composite/max_col_sum']:.6g} / {g['composite/min_col_sum']:.6g} | ≤ 2 and ≥ 0.5 | "
                   f"≈ 1.6 max gain (Xie et al., 30 layers) | {'met' if ok else '**not met**'} |")
    lite = [r for r in rows if r["gate"] == "mhc_lite" and r["gain_trained"]]
    if lite:
        dev = max(max(abs(r[k]["composite/max_row_sum"] - 1), abs(r[k]["composite/max_col_sum"] - 1),
                      abs(r[k]["composite/min_col_sum"] - 1)) for r in lite for k in ("gain_init", "gain_trained"))
        depths = ", ".join(f"{b:,}" for b in sorted({r["blocks"] for r in lite}))
        out.append(f"| mhc_lite: composite row and column sums − 1, at init and trained ({depths} blocks) | "
                   f"{dev:.1e} | within 1e-5 | exactly doubly stochastic | {'met' if dev <= 1e-5 else '**not met**'} |")
    hc = sorted((r for r in rows if r["gate"] == "hc" and r["gain_trained"]), key=lambda r: r["blocks"])
    if hc:
        gains = " / ".join(f"{r['gain_trained']['composite/max_row_sum']:.3g}" for r in hc)
        depths = " / ".join(f"{r['blocks']:,}" for r in hc)
        out.append(f"| hc (n = 4): composite max row sum after training, {depths} blocks | {gains} | reported | "
                   "≈ 3000 (Xie et al., 27B model) | – |")
    high = by.get((1000, "highway"))
    if mhc and high:
        ok = mhc["val_acc"] >= high["val_acc"]
        out.append(f"| mhc (n = 4) val accuracy at 1,000 blocks vs the highway default, {mhc['steps']} steps, lr 0.05 | "
                   f"{100 * mhc['val_acc']:.1f} % vs {100 * high['val_acc']:.1f} % | ≥ highway | – | "
                   f"{'met' if ok else '**not met**'} |")
    deep = sorted((r for r in rows if r["blocks"] == 10000), key=lambda r: GATES.index(r["gate"]))
    if deep:
        accs = ", ".join(f"{r['gate']} {100 * r['val_acc']:.1f} %" for r in deep)
        out.append(f"| every member at 10,000 blocks, {deep[0]['steps']} steps: val accuracy | {accs} | reported | – | – |")
    for width in sorted({s.get("width", 50) for s in step_time if s.get("kernels")}):
        latest = [s for s in step_time if s.get("kernels") and s.get("width", 50) == width][-1]
        ok = latest["ratio"] <= 1.5
        out.append(f"| Step time mhc (n = 4) ÷ gated, {latest['blocks']} blocks, batch {latest['batch']}, width {width}, "
                   f"one CPU thread | {latest['ratio']:.2f} | ≤ 1.5 | mHC: +6.7 % with fused GPU kernels | "
                   f"{'met' if ok else '**not met**'} |")
    path.write_text("\n".join(out) + "\n")


def write_figure(rows: list[dict], path: Path) -> None:
    """Training-loss curves, one panel per depth, one line per gate (a 5-step moving mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({r["blocks"] for r in rows})
    if not depths:
        return
    fig, axes = plt.subplots(1, len(depths), figsize=(3.2 * len(depths), 3.0), squeeze=False, sharey=True)
    for ax, blocks in zip(axes[0], depths, strict=True):
        for r in sorted((r for r in rows if r["blocks"] == blocks), key=lambda r: GATES.index(r["gate"])):
            losses = torch.tensor(r["losses"]).nan_to_num(nan=10.0).clamp(max=10.0)
            smooth = losses.unfold(0, min(5, len(losses)), 1).mean(1) if len(losses) >= 5 else losses
            ax.plot(range(1, len(smooth) + 1), smooth.tolist(), label=f"{r['gate']} ({100 * r['val_acc']:.0f} %)")
        ax.set_title(f"{blocks:,} blocks")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def step_time(blocks: int, streams: int, batch: int, repeats: int, width: int = 50) -> dict:
    """Median step times of gated and mhc, and, to show where mhc's time goes, of mhc with one Sinkhorn
    iteration and of mhc_lite (no iterations), all interleaved in one process."""
    torch.manual_seed(0)
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    nets = {"gated": build("gated", blocks, streams, width), "mhc": build("mhc", blocks, streams, width),
            "mhc_1_iter": build("mhc", blocks, streams, width, sinkhorn_iters=1),
            "mhc_lite": build("mhc_lite", blocks, streams, width)}
    opts = {k: build_optimizer(n, OptimizerConfig()) for k, n in nets.items()}
    times: dict[str, list[float]] = {k: [] for k in nets}
    for i in range(repeats + 2):  # interleaved, so that a change in the machine's load hits both
        for name, net in nets.items():
            start = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(net(x), y)
            opts[name].zero_grad(set_to_none=True)
            loss.backward()
            opts[name].step()
            if i >= 2:  # the first two steps warm up allocator and caches
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"blocks": blocks, "batch": batch, "width": width, "kernels": cpu_kernels.available(),
            "gated_s": med["gated"], "mhc_s": med["mhc"],
            "ratio": med["mhc"] / med["gated"], "mhc_1_iter_s": med["mhc_1_iter"], "mhc_lite_s": med["mhc_lite"],
            "load": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[10, 100, 1000, 10000], help="blocks")
    p.add_argument("--gates", nargs="+", default=list(GATES))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="depths 10 and 100, 20 steps")
    p.add_argument("--out", type=Path, default=RESULTS / "hyper_depth.md")
    p.add_argument("--step-time", action="store_true", help="only the side-by-side step time of mhc and gated")
    p.add_argument("--report-only", action="store_true", help="only rewrite --out from the stored rows")
    p.add_argument("--step-depth", type=int, default=100, help="blocks for --step-time")
    p.add_argument("--batch", type=int, default=64, help="batch for --step-time")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per net for --step-time")
    p.add_argument("--width", type=int, default=50, help="layer width for --step-time (the sweep's nets: 50)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.depths, args.steps = [10, 100], 20
    store = args.out.with_suffix(".jsonl")
    timing_store = args.out.with_name(args.out.stem + "_step_time.jsonl")
    if args.report_only:
        write_markdown(read_rows(store), args.out, read_timings(timing_store))
        return
    print(f"# torch {torch.__version__}, threads {args.threads}, load average {os.getloadavg()[0]:.1f}")
    if args.step_time:
        result = step_time(args.step_depth, args.streams, args.batch, args.repeats, args.width)
        print(f"step time at {result['blocks']} blocks, batch {result['batch']}: gated {result['gated_s']:.4f} s, "
              f"mhc (n = {args.streams}) {result['mhc_s']:.4f} s; mhc ÷ gated = {result['ratio']:.2f} (target <= 1.5); "
              f"mhc with 1 Sinkhorn iteration ÷ gated = {result['mhc_1_iter_s'] / result['gated_s']:.2f}, "
              f"mhc_lite ÷ gated = {result['mhc_lite_s'] / result['gated_s']:.2f}")
        with timing_store.open("a") as f:
            f.write(json.dumps(result) + "\n")
        write_markdown(read_rows(store), args.out, read_timings(timing_store))
        return
    for blocks in sorted(args.depths):
        for gate in args.gates:
            r = run(gate, blocks, args.steps, args.streams)
            print(f"{blocks:>6} {gate:>9}: acc {100 * r['val_acc']:.1f} %, loss {r['final_loss']:.3g}, "
                  f"step {r['step_s']:.3f} s, gain init {_fmt_gain(r['gain_init'])}, "
                  f"trained {_fmt_gain(r['gain_trained'])}", flush=True)
            with store.open("a") as f:
                f.write(json.dumps(r) + "\n")
            # re-read: another invocation (a deeper depth, --step-time) may have added rows meanwhile
            write_markdown(read_rows(store), args.out, read_timings(timing_store))


if __name__ == "__main__":
    main()
