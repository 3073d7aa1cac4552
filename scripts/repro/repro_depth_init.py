"""Which depth rule trains at 10, 100, 1,000 and 10,000 layers? The init presets on the digits, through `deepres fit`.

    .venv/bin/python scripts/repro/repro_depth_init.py                          # depths 10 100 1000, 300 steps each
    .venv/bin/python scripts/repro/repro_depth_init.py --depths 10000 --nets rezero --append   # add 10,000-block runs
    .venv/bin/python scripts/repro/repro_depth_init.py --quick                  # smoke test: depth 10, 20 steps
    .venv/bin/python scripts/repro/repro_depth_init.py --long-run 10000 10      # the default job at 10,000 blocks, 10 epochs:
                                                                                 # 18 min 14 s on one core (docs/RESULTS.md)

For each net and depth L (hidden layers of `highway_mlp`, width 50, ReLU; 1 plain layer + L − 1 blocks):
  1. the error-flow ratio ‖∂L/∂x₀‖ ÷ ‖∂L/∂x_L‖ at initialisation on 64 training digits
     (deepres.models.error_flow.error_flow_ratio, float32; docs/science.md#measuring-error-flow);
  2. `deepres fit` on the digits (batch 64, SGD + Nesterov 0.9, lr 0.05, cosine, the default job's
     settings) for a fixed budget of --steps optimizer steps with the preset passed as
     `--model.arch_args`, then the final training loss (eval mode, all 1,437 training digits) and
     validation accuracy (360 digits) of checkpoints/last.ckpt, and the wall time of the fit.
The plain delta-orthogonal net is the conv net (`highway_cnn_cifar` with one stage of 16 channels on
1×8×8 digits, no norm); its training runs stop at --conv-max-depth (a conv layer costs ~40× a dense one).
It is trained with Adam (lr 1e-3) instead: at init a delta-orthogonal net is a per-pixel map (only the
centre taps are non-zero), and with SGD at lr 0.05–0.002 this 16-channel norm-free conv net stays at
chance even at depth 10, as does the same net with PyTorch's default init; Adam breaks the symmetry.

"SGD did not stall for networks with more than 1000 layers" (Srivastava et al. 2015, Sec. 4.1) is
tested at 1,000 and 10,000: stalled = final training loss above 90 % of the initial ln 10 ≈ 2.30.
Writes depth_init.{csv,md,png} and depth_init_summary.md to --out-dir; --append adds to the CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import command_line, fit_logged, run_all, save_figure, write_csv  # noqa: E402  (scripts/ is on sys.path)

from deepres.training.run_dir import environment  # noqa: E402

# label -> (arch, model overrides shared by error flow and fit); init/norm/drop_path via arch_args
NETS: dict[str, tuple[str, dict]] = {
    "highway (default bias)": ("highway_mlp", {"gate": "highway"}),
    "highway (bias −3)": ("highway_mlp", {"gate": "highway", "gate_bias": -3.0}),
    "residual + rezero": ("highway_mlp", {"gate": "residual", "init": "rezero"}),
    "residual + fixup": ("highway_mlp", {"gate": "residual", "init": "fixup"}),
    "residual + layerscale": ("highway_mlp", {"gate": "residual", "init": "layerscale"}),
    "residual + skipinit": ("highway_mlp", {"gate": "residual", "init": "skipinit"}),
    "residual + deepnorm": ("highway_mlp", {"gate": "residual", "init": "deepnorm"}),
    "residual + rezero, lr 5/L": ("highway_mlp", {"gate": "residual", "init": "rezero"}),
    "residual + fixup, lr 5/L": ("highway_mlp", {"gate": "residual", "init": "fixup"}),
    "residual + layerscale, lr 5/L": ("highway_mlp", {"gate": "residual", "init": "layerscale"}),
    "plain + orthogonal": ("highway_mlp", {"gate": "plain", "init": "orthogonal"}),
    "plain + delta-orthogonal (conv)": ("highway_cnn_cifar", {"gate": "plain", "init": "delta_orthogonal"}),
    "plain + He": ("highway_mlp", {"gate": "plain"}),
}
SHORT = {"default": "highway (default bias)", "minus3": "highway (bias −3)", "rezero": "residual + rezero",
         "fixup": "residual + fixup", "layerscale": "residual + layerscale",
         "skipinit": "residual + skipinit", "deepnorm": "residual + deepnorm",
         "rezero-lr": "residual + rezero, lr 5/L", "fixup-lr": "residual + fixup, lr 5/L",
         "layerscale-lr": "residual + layerscale, lr 5/L", "orthogonal": "plain + orthogonal",
         "delta": "plain + delta-orthogonal (conv)", "he": "plain + He"}
DEPTH_AWARE = ("highway (default bias)", "residual + rezero", "residual + fixup", "residual + layerscale",
               "residual + skipinit", "residual + deepnorm")
STALL = 0.9 * math.log(10)
# extra `deepres fit` arguments for one net at depth L (the rest use the default job's optimizer)
FIT_ARGS: dict[str, Callable[[int], list[str]]] = {
    "plain + delta-orthogonal (conv)": lambda depth: ["--model.optim.name", "adam", "--model.optim.lr", "1e-3"],
    **{net: (lambda depth: ["--model.optim.lr", f"{5 / depth:g}"])
       for net in ("residual + rezero, lr 5/L", "residual + fixup, lr 5/L", "residual + layerscale, lr 5/L")},
}


def model_args(net: str, depth: int) -> tuple[str, dict]:
    arch, args = NETS[net]
    args = dict(args)
    if arch == "highway_cnn_cifar":  # 1 plain conv stem + (L − 1) conv blocks, one stage of 16 channels
        args.update(widths=[16], blocks_per_stage=[depth - 1], in_chans=1)
    else:
        args.update(depth=depth, width=50)
    return arch, args


def error_flow_at_init(net: str, depth: int, seed: int) -> float:
    import torch

    from deepres.data import DigitsDataModule
    from deepres.models import create_model
    from deepres.models.error_flow import error_flow_ratio

    arch, args = model_args(net, depth)
    data = DigitsDataModule(layout="image" if arch == "highway_cnn_cifar" else "flat")
    data.setup("fit")
    x, y = data.train_set.tensors
    torch.manual_seed(seed)
    extra = {"in_features": 64} if arch == "highway_mlp" else {}
    model = create_model(arch, num_classes=10, **extra, **args)
    n = 16 if arch == "highway_cnn_cifar" else 64
    return error_flow_ratio(model, x[:n], y[:n])


def run_one(job: dict) -> dict:
    """Error flow at init, then one `deepres fit` and the trained net's loss/accuracy."""
    import torch
    import torch.nn.functional as F

    from deepres.data import DigitsDataModule
    from deepres.training import Classifier
    from deepres.training.checkpoints import load_module

    net, depth, seed = job["net"], job["depth"], job["seed"]
    start = time.perf_counter()
    ratio = error_flow_at_init(net, depth, seed)
    flow_s = time.perf_counter() - start
    row = {"net": net, "depth": depth, "seed": seed, "steps": job["steps"], "error_flow_ratio": ratio,
           "error_flow_s": round(flow_s, 1), "final_train_loss": "", "val_acc": "", "fit_s": ""}
    if not job["train"]:
        return row
    arch, args = model_args(net, depth)
    conv = arch == "highway_cnn_cifar"
    argv = ["fit", "--model.arch", arch, "--model.arch_args", json.dumps(args),
            "--data.layout", "image" if conv else "flat",
            "--trainer.max_steps", str(job["steps"]), "--trainer.max_epochs", "100000",
            "--trainer.check_val_every_n_epoch", "100000", "--trainer.num_sanity_val_steps", "0",
            "--seed_everything", str(seed), "--data.seed", str(seed), "--wandb.enabled", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--run.root", job["root"], "--run.name", job["name"], *FIT_ARGS.get(net, lambda depth: [])(depth)]
    fit_s = fit_logged(argv, Path(job["root"]) / f"{job['name']}.log")
    model = load_module(Classifier, Path(job["root"]) / job["name"] / "checkpoints" / "last.ckpt").eval()
    data = DigitsDataModule(layout="image" if conv else "flat")
    data.setup("fit")
    with torch.no_grad():
        x, y = data.train_set.tensors
        loss = float(F.cross_entropy(torch.cat([model(c) for c in x.split(256)]), y))
        xv, yv = data.val_set.tensors
        acc = float((model(xv).argmax(1) == yv).float().mean())
    row.update(final_train_loss=loss, val_acc=acc, fit_s=round(fit_s, 1))
    return row


def long_run(depth: int, epochs: int, root: str) -> dict:
    """The default job (Highway, gate bias −ln L − 1) at `depth` for its full schedule of `epochs`."""
    from deepres.training.cli import main as deepres_main

    argv = ["fit", "--model.depth", str(depth), "--trainer.max_epochs", str(epochs), "--wandb.enabled", "false",
            "--trainer.enable_progress_bar", "false", "--run.root", root, "--run.name", f"long_L{depth}"]
    start = time.perf_counter()
    code = deepres_main(argv)
    if code != 0:
        raise RuntimeError(f"deepres {' '.join(argv)} exited with {code}")
    return long_run_row(Path(root) / f"long_L{depth}", depth, epochs, time.perf_counter() - start,
                        "deepres " + " ".join(argv[:5]))


def long_run_row(run_dir: Path, depth: int, epochs: int, wall_s: float, command: str) -> dict:
    """Validation accuracy after every epoch of a finished run, from its metrics.csv."""
    with open(run_dir / "metrics.csv") as f:
        accs = [(int(r["epoch"]), float(r["val/acc1"])) for r in csv.DictReader(f) if r.get("val/acc1")]
    accs = [a for _, a in sorted(accs)]
    reached = next((i + 1 for i, a in enumerate(accs) if all(b >= 0.95 - 1e-6 for b in accs[i:])), None)
    return {"depth": depth, "epochs": epochs, "wall_s": round(wall_s, 1), "command": command,
            "val_acc_per_epoch": " ".join(f"{a:.4f}" for a in accs), "final_val_acc": accs[-1],
            "held_95_from_epoch": reached or ""}


def write_long_summary(path: Path, row: dict) -> None:
    held = row["held_95_from_epoch"]
    path.write_text(
        f"| Val accuracy at L = {row['depth']}, the default Highway job for {row['epochs']} epochs (`{row['command']}`) | "
        f"{100 * float(row['final_val_acc']):.1f} % in {float(row['wall_s']) / 60:.1f} min"
        + (f", ≥ 95 % from epoch {held} on" if held != "" else "") + " | ≥ 95 % | Highway: SGD trains > 1000 layers | "
        f"{'met' if held != '' else '**not met**'} |\n")


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = list(csv.DictReader(path.open()))
    for r in rows:
        r["depth"], r["seed"], r["steps"] = int(r["depth"]), int(r["seed"]), int(r["steps"])
        for k in ("error_flow_ratio", "final_train_loss", "val_acc", "fit_s", "error_flow_s"):
            r[k] = float(r[k]) if r[k] not in ("", None) else ""
    return rows


def fmt(v, spec: str) -> str:
    return "–" if v == "" else format(v, spec)


def write_table(path: Path, rows: list[dict], header: str) -> None:
    depths = sorted({r["depth"] for r in rows})
    trained_steps = [r["steps"] for r in rows if r["final_train_loss"] != ""] or [r["steps"] for r in rows]
    usual_steps = max(set(trained_steps), key=trained_steps.count)
    cell = {(r["net"], r["depth"]): r for r in rows}
    lines = ["### Depth-aware initialisation: which rule trains at 10,000 layers", "", header, "",
             f"`highway_mlp` (width 50, ReLU) on the digits, {usual_steps} SGD steps of batch 64 per run (unless the cell says) "
             "(lr 0.05, cosine, Nesterov 0.9), one seed. Each cell: error-flow ratio at init / final training loss / "
             "validation accuracy / wall time of the `deepres fit` run; – = not run. "
             + f"plain + delta-orthogonal (conv): `{' '.join(FIT_ARGS['plain + delta-orthogonal (conv)'](0))}`; "
             "\"lr 5/L\": `--model.optim.lr` 5 ÷ depth.", "",
             "| net | " + " | ".join(f"L = {d}" for d in depths) + " |",
             "| --- | " + " | ".join("---" for _ in depths) + " |"]
    for net in NETS:
        cells = []
        for d in depths:
            r = cell.get((net, d))
            if r is None:
                cells.append("–")
                continue
            text = f"{r['error_flow_ratio']:.3g}"
            if r["final_train_loss"] != "":
                text += f" / {r['final_train_loss']:.3f} / {100 * r['val_acc']:.1f} % / {r['fit_s']:.0f} s"
                if r["steps"] != usual_steps:
                    text += f" ({r['steps']} steps)"
            cells.append(text)
        lines.append(f"| {net} | " + " | ".join(cells) + " |")
    lines += ["", stall_sentence(rows), "", "Every run: `docs/results/depth_init.csv`.", "",
              "![depth-aware init sweep](results/depth_init.png)", ""]
    path.write_text("\n".join(lines))


def stall_sentence(rows: list[dict]) -> str:
    parts = []
    for d in (1000, 10000):
        trained = [r for r in rows if r["depth"] == d and r["final_train_loss"] != ""]
        if not trained:
            parts.append(f"L = {d}: not trained.")
            continue
        moving = [r["net"] for r in trained if r["final_train_loss"] < STALL]
        stalled = [r["net"] for r in trained if r["final_train_loss"] >= STALL]
        diverged = [r["net"] for r in trained if math.isnan(r["final_train_loss"])]
        parts.append(f"L = {d}: SGD moved the loss below {STALL:.2f} for {', '.join(moving) or 'none'}"
                     + (f"; stalled for {', '.join(stalled)}" if stalled else "")
                     + (f"; diverged (NaN) for {', '.join(diverged)}" if diverged else "") + ".")
    return "Did SGD stall (Srivastava et al. 2015: not beyond 1000 layers)? " + " ".join(parts)


def write_summary(path: Path, rows: list[dict]) -> None:
    deepest = max(r["depth"] for r in rows)
    flows = [r for r in rows if r["depth"] == deepest and r["net"] in DEPTH_AWARE]
    best = max((r for r in rows if r["depth"] == deepest and r["val_acc"] != ""), key=lambda r: r["val_acc"], default=None)
    lines = []
    if flows:
        lo = min(r["error_flow_ratio"] for r in flows)
        hi = max(r["error_flow_ratio"] for r in flows)
        lines.append(f"| Error flow at init, depth-aware presets, L = {deepest} | {lo:.3g}–{hi:.3g} | within [0.3, 3] | "
                     f"≈ 1 by construction | {'met' if lo >= 0.3 and hi <= 3 else '**not met**'} |")
    if best is not None:
        lines.append(f"| Val accuracy at L = {deepest} in the sweep's budget, best preset ({best['net']}, {best['steps']} steps) | "
                     f"{100 * best['val_acc']:.1f} % in {best['fit_s']:.0f} s | reported (≥ 95 %: the full-schedule run, "
                     "`--long-run`) | Highway: SGD trains > 1000 layers | – |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for net, marker in zip(NETS, "osD^v<>p*hX", strict=False):
        sel = sorted((r for r in rows if r["net"] == net), key=lambda r: r["depth"])
        if not sel:
            continue
        axes[0].plot([r["depth"] for r in sel], [max(r["error_flow_ratio"], 1e-30) for r in sel], marker=marker, label=net)
        trained = [r for r in sel if r["final_train_loss"] != ""]
        axes[1].plot([r["depth"] for r in trained], [r["final_train_loss"] for r in trained], marker=marker, label=net)
        axes[2].plot([r["depth"] for r in trained], [100 * r["val_acc"] for r in trained], marker=marker, label=net)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("error-flow ratio at init")
    axes[1].set_yscale("log")
    axes[1].axhline(STALL, color="grey", ls=":", lw=1)
    axes[1].set_ylabel("final training loss")
    axes[2].set_ylabel("validation accuracy (%)")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("depth L (hidden layers)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Depth-aware initialisation presets on the digits")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--nets", nargs="+", default=list(SHORT), choices=list(SHORT))
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--conv-max-depth", type=int, default=100, help="deepest conv net that is trained")
    parser.add_argument("--flow-only", action="store_true", help="error flow at init only, no training")
    parser.add_argument("--append", action="store_true", help="add to (replace matching rows of) the CSV")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/results"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--render-only", action="store_true", help="rewrite the table, summary and figure from the CSV")
    parser.add_argument("--long-run", nargs=2, type=int, metavar=("DEPTH", "EPOCHS"),
                        help="instead of the sweep: the default job at DEPTH for EPOCHS epochs (10000 10: ~20 min on one core)")
    args = parser.parse_args(argv)
    if args.long_run:
        row = long_run(*args.long_run, root=tempfile.mkdtemp(prefix="depth_long_"))
        args.out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(args.out_dir / "depth_init_long.csv", [row])
        write_long_summary(args.out_dir / "depth_init_long_summary.md", row)
        print(json.dumps(row))
        return 0
    if args.render_only:
        rows = read_csv(args.out_dir / "depth_init.csv")
        old = (args.out_dir / "depth_init.md").read_text().splitlines() if (args.out_dir / "depth_init.md").exists() else []
        header = old[2] if len(old) > 2 else f"`{command_line('repro_depth_init.py', argv)}`"
        write_table(args.out_dir / "depth_init.md", rows, header)
        write_summary(args.out_dir / "depth_init_summary.md", rows)
        plot(args.out_dir / "depth_init.png", rows)
        return 0
    if args.quick:
        args.depths, args.steps = [10], 20
    env = environment(1)
    print(env, flush=True)
    root = tempfile.mkdtemp(prefix="depth_init_")
    jobs = [{"net": SHORT[n], "depth": d, "seed": args.seed, "steps": args.steps, "root": root,
             "name": f"{n}_L{d}", "train": not args.flow_only and not (n == "delta" and d > args.conv_max_depth)}
            for d in args.depths for n in args.nets]
    start = time.perf_counter()
    new = []
    for row in run_all(run_one, jobs, args.jobs, threads=1):
        new.append(row)
        print(json.dumps(row), flush=True)
    seconds = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.out_dir / "depth_init.csv"
    rows = read_csv(csv_path) if args.append else []
    merged = {(r["net"], r["depth"]): r for r in rows}
    for n in new:  # a new row replaces an old one, except a flow-only row never hides a trained one
        old = merged.get((n["net"], n["depth"]))
        if old is None or n["final_train_loss"] != "" or old["final_train_loss"] == "":
            merged[n["net"], n["depth"]] = n
    rows = list(merged.values())
    rows.sort(key=lambda r: (r["depth"], list(NETS).index(r["net"])))
    write_csv(csv_path, rows)
    header = f"`{command_line('repro_depth_init.py', argv)}` (last invocation; runs accumulate with --append) — {seconds:.0f} s. {env}."
    write_table(args.out_dir / "depth_init.md", rows, header)
    write_summary(args.out_dir / "depth_init_summary.md", rows)
    plot(args.out_dir / "depth_init.png", rows)
    print(f"wrote {csv_path}, depth_init.md, depth_init.png in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
