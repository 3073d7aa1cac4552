"""Highway depth sweep (Srivastava, Greff & Schmidhuber 2015, Fig. 1) on scikit-learn's digits, through `deepres fit`.

    .venv/bin/python scripts/repro/repro_highway_sweep.py            # 4 depths x 2 nets x 5 lrs x 3 seeds, ~5 min on 2 quiet cores
    .venv/bin/python scripts/repro/repro_highway_sweep.py --quick    # smoke test: 2 shallow nets, 1 epoch

Paper: fully connected nets of 1 plain layer + 9/19/49/99 layers, either plain (71 units) or highway
(50 units, about the same parameters), trained with SGD on MNIST with the best hyperparameters
found per configuration; plain nets get worse with depth, and at depth 100 the highway net ends
with a training loss more than two orders of magnitude (> 100x) below the plain one.

Here every run is `deepres fit --config configs/highway_sweep_digits.yaml` (1,437 training digits,
batch 64, SGD with Nesterov momentum 0.9, constant lr, 20 epochs = 440 steps) with overrides
`--model.depth D --model.optim.lr LR --seed_everything S --data.seed S`, and for the plain net
`--model.gate plain --model.width 71`. The highway net keeps deepres's default gate bias
(depth-aware −ln(L − 1) − 1). Both nets get the same optimiser budget: the same lr grid and the
same number of steps; as in the paper, the lr is then chosen per net type and depth (the grid point
with the lowest mean final loss). Final training loss = mean cross-entropy of the trained net over
all 1,437 training digits (eval mode, from checkpoints/last.ckpt). Runs go to --jobs worker
processes with one torch thread each. Writes highway_sweep.{csv,md,png} to --out-dir.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "highway_sweep_digits.yaml"
NETS = {"plain": ["--model.gate", "plain", "--model.width", "71"], "highway": ["--model.gate", "highway", "--model.width", "50"]}
PAPER_RATIO = 100.0  # Srivastava et al. 2015, Fig. 1: > 2 orders of magnitude at depth 100
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import add_standard_arguments, fit_logged, run_all, save_figure, write_results_csv  # noqa: E402  (scripts/ is on sys.path)

from deepres.training.run_dir import environment  # noqa: E402


def run_one(job: dict) -> dict:
    """One `deepres fit`, then the trained net's mean cross-entropy over the whole training set."""
    import torch
    import torch.nn.functional as F

    from deepres.data import DigitsDataModule
    from deepres.training import Classifier
    from deepres.training.checkpoints import load_module

    argv = ["fit", "--config", str(CONFIG), *NETS[job["net"]],
            "--model.depth", str(job["depth"]), "--model.optim.lr", str(job["lr"]),
            "--seed_everything", str(job["seed"]), "--data.seed", str(job["seed"]),
            "--trainer.max_epochs", str(job["epochs"]),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--run.root", job["root"], "--run.name", job["name"]]
    seconds = fit_logged(argv, Path(job["root"]) / f"{job['name']}.log")
    model = load_module(Classifier, Path(job["root"]) / job["name"] / "checkpoints" / "last.ckpt").eval()
    data = DigitsDataModule()
    data.setup("fit")
    with torch.no_grad():
        x, y = data.train_set.tensors
        train_loss = float(F.cross_entropy(model(x), y))
        xv, yv = data.val_set.tensors
        val_acc = float((model(xv).argmax(1) == yv).float().mean())
    return {**{k: job[k] for k in ("net", "depth", "lr", "seed")}, "final_train_loss": train_loss,
            "val_acc": val_acc, "seconds": round(seconds, 1)}


def best_lr(rows: list[dict], net: str, depth: int) -> tuple[float, list[float]]:
    """The grid lr with the lowest mean final loss (a diverged run, NaN, counts as +inf)."""
    by_lr: dict[float, list[float]] = {}
    for r in rows:
        if r["net"] == net and r["depth"] == depth:
            loss = r["final_train_loss"]
            by_lr.setdefault(r["lr"], []).append(loss if math.isfinite(loss) else math.inf)
    lr = min(by_lr, key=lambda k: statistics.mean(by_lr[k]))
    return lr, by_lr[lr]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_table(path: Path, rows: list[dict], depths: list[int], header: str) -> None:
    lines = [
        "### Highway depth sweep (Srivastava et al. 2015, Fig. 1) on the digits",
        "",
        header,
        "",
        "Final training cross-entropy (mean ± std over seeds, at the lr of the grid that is best for that net",
        "and depth). Paper (MNIST): plain nets get worse with depth; at depth 100 the highway net ends > 100×",
        "lower than the plain one. Target here: the same, plain ÷ highway > 100 at depth 100.",
        "",
        "| depth | plain, 71 units (best lr) | highway, 50 units (best lr) | plain ÷ highway | paper | verdict |",
        "| ---: | ---: | ---: | ---: | --- | --- |",
    ]
    previous_plain = None
    for depth in depths:
        cells, means = [], {}
        for net in NETS:
            lr, losses = best_lr(rows, net, depth)
            mean, std = mean_std(losses)
            means[net] = mean
            cells.append(f"{mean:.3g} ± {std:.2g} (lr {lr:g})")
        ratio = means["plain"] / means["highway"] if means["highway"] > 0 else math.inf
        paper = "plain trains"
        verdict = "as paper" if means["plain"] < 0.5 * math.log(10) else "**not reproduced**"
        if previous_plain is not None:
            paper = "plain worse than one row up"
            verdict = "as paper" if means["plain"] > 1.05 * previous_plain else "**not reproduced**"
        if means["plain"] > 0.99 * math.log(10):
            verdict += " (plain at chance, ln 10 = 2.303)"
        if depth == 100:
            paper += "; highway > 100× lower"
            verdict += "; ratio **met**" if ratio > PAPER_RATIO else "; ratio **not met**"
        previous_plain = means["plain"]
        lines.append(f"| {depth} | {cells[0]} | {cells[1]} | {ratio:.3g}× | {paper} | {verdict.strip('; ')} |")
    lines += ["", "Every run (all lrs and seeds, with validation accuracy): `docs/results/highway_sweep.csv`.", "",
              "![highway depth sweep](results/highway_sweep.png)", ""]
    path.write_text("\n".join(lines))


def write_summary(path: Path, rows: list[dict], depths: list[int]) -> None:
    """This result's rows of the summary table in docs/RESULTS.md (result | measured | target | paper | verdict)."""
    shallow, deep = min(depths), max(depths)
    plain = {d: mean_std(best_lr(rows, "plain", d)[1])[0] for d in (shallow, deep)}
    ratio = plain[deep] / mean_std(best_lr(rows, "highway", deep)[1])[0]
    trains = plain[shallow] < 0.5 * math.log(10)
    path.write_text(
        f"| Highway depth sweep (digits): plain ÷ highway final training loss at depth {deep} | {ratio:.3g}× | "
        f"> 100× | > 100× (MNIST, Fig. 1) | {'met' if ratio > PAPER_RATIO else '**not met**'} |\n"
        f"| Highway depth sweep: a plain net of depth {shallow} trains | final loss {plain[shallow]:.3g} "
        f"(chance: ln 10 = 2.303) | trains (loss < ½ ln 10 = 1.15) | trains, then worse with depth | "
        f"{'as paper' if trains else '**not reproduced**'} |\n")


def plot(path: Path, rows: list[dict], depths: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for net, colour in (("plain", "tab:red"), ("highway", "tab:blue")):
        lrs = sorted({r["lr"] for r in rows if r["net"] == net})
        for lr in lrs:  # every grid point, faint
            ys = [statistics.mean(r["final_train_loss"] for r in rows
                                  if r["net"] == net and r["depth"] == d and r["lr"] == lr) for d in depths]
            ax.plot(depths, ys, color=colour, alpha=0.25, lw=1)
        best = [mean_std(best_lr(rows, net, d)[1]) for d in depths]
        ax.errorbar(depths, [m for m, _ in best], yerr=[s for _, s in best], color=colour, marker="o", lw=2,
                    capsize=3, label=f"{net} ({'71' if net == 'plain' else '50'} units), best lr per depth")
    ax.set_yscale("log")
    ax.set_xticks(depths)
    ax.set_xlabel("depth (hidden layers)")
    ax.set_ylabel("final training cross-entropy")
    ax.set_title("Depth sweep on the digits (faint: each lr of the grid)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.003, 0.01, 0.03, 0.1, 0.3], help="the lr grid, for both nets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="epochs of 22 steps (the config's 20 = 440 steps)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel worker processes")
    add_standard_arguments(parser, "depth 2, 1 epoch, 1 lr, 1 seed, 1 job", threads="torch intra-op threads per worker")
    args = parser.parse_args(argv)
    if args.quick:
        args.depths, args.lrs, args.seeds, args.epochs, args.jobs = [2], [0.05], [0], 1, 1
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the workers
    # dozens of short runs: no wandb run for each unless asked for (WANDB_MODE=offline/online)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(env, flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="highway_sweep_") as root:
        # deepest first so the long runs do not end up alone at the tail of the pool
        jobs = [{"net": net, "depth": d, "lr": lr, "seed": s, "epochs": args.epochs, "root": root,
                 "name": f"{net}-{d}-lr{lr:g}-s{s}"}
                for d in sorted(args.depths, reverse=True) for net in NETS for lr in args.lrs for s in args.seeds]
        rows = []
        for row in run_all(run_one, jobs, args.jobs, args.threads):
            rows.append(row)
            print(f"{row['net']:8s} depth {row['depth']:4d} lr {row['lr']:<5g} seed {row['seed']}: "
                  f"final train loss {row['final_train_loss']:.4g}, val acc {row['val_acc']:.3f} "
                  f"({row['seconds']:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    rows.sort(key=lambda r: (r["net"], r["depth"], r["lr"], r["seed"]))
    command = write_results_csv(args.out_dir, "highway_sweep", rows, "repro_highway_sweep.py", argv)
    header = (f"`{command}` — {len(rows)} runs of `deepres fit --config configs/highway_sweep_digits.yaml`: "
              f"depths {args.depths}, lr grid {args.lrs} for both nets, seeds {args.seeds} "
              f"({len(args.seeds)} trials per point), {args.epochs} epochs × 22 steps of batch 64; "
              f"{args.jobs} worker processes, {seconds / 60:.1f} min. {env}.")
    write_table(args.out_dir / "highway_sweep.md", rows, sorted(args.depths), header)
    write_summary(args.out_dir / "highway_sweep_summary.md", rows, args.depths)
    plot(args.out_dir / "highway_sweep.png", rows, sorted(args.depths))
    print(f"wrote {args.out_dir}/highway_sweep.csv, highway_sweep.md, highway_sweep.png in {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
