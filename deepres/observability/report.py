"""`deepres report RUN_DIR [--out DIR]`: PNG figures of a run, drawn from its files, no server needed.

    loss.png, accuracy.png   curves from metrics.csv (Lightning's CSVLogger: `step`, `train/loss`, `val/acc1`, …)
    grad_norm.png            ‖∂L/∂θ‖ per block over training (block × step, log colour) and its profile
    gates.png                mean gate openness per block over training (transform t; carry g if any)
    act_rms.png              root-mean-square activation per block over training
    error_flow.png           ‖∂L/∂x₀‖ / ‖∂L/∂x_L‖ over training (1.0: the error reaches block 0 undiminished)
    composite_gain.png       multi-stream blocks: row and column sums of ∏H^res over all blocks, over training

The depth figures come from `depth.jsonl`, written by `deepres.observability.diagnostics.DepthDiagnostics`; their
functions live in `deepres.observability.depth_figures`, which that callback also uses for its wandb heatmaps. A
missing piece (no gates, no metrics file) is skipped with a note.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from deepres.observability.depth_figures import (
    DEPTH_FILE,
    DepthHistory,
    act_rms_figure,
    composite_gain_figure,
    error_flow_figure,
    gate_figure,
    grad_norm_figure,
    read_depth_file,
)

METRICS_FILE = "metrics.csv"


# ----------------------------------------------------------------------------------------------
# Reading a run
# ----------------------------------------------------------------------------------------------
def read_metrics_csv(paths: Iterable[Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{key: (steps, values)} from Lightning CSVLogger files (each row has only some keys filled)."""
    series: dict[str, dict[int, float]] = {}
    for path in paths:
        with Path(path).open(newline="") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                if not step:
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or value in (None, ""):
                        continue
                    try:
                        series.setdefault(key, {})[int(float(step))] = float(value)
                    except ValueError:
                        continue
    return {k: (np.array(sorted(v)), np.array([v[s] for s in sorted(v)])) for k, v in series.items()}


def find_files(run_dir: Path, name: str) -> list[Path]:
    """`run_dir/name`, else every `name` below it (e.g. CSVLogger's version_N/), oldest first."""
    direct = run_dir / name
    if direct.is_file():
        return [direct]
    found = [p for p in run_dir.rglob(name) if "wandb" not in p.parts]
    return sorted(found, key=lambda p: p.stat().st_mtime)


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def curve_figure(series: dict[str, tuple[np.ndarray, np.ndarray]], match: str, title: str) -> Figure | None:
    """Every metric whose last name part starts with `match` (`train/loss`, `val/loss_epoch`, `val/acc1`)."""
    keys = sorted(k for k in series if k.rsplit("/", 1)[-1].startswith(match))
    if not keys:
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    values = []
    for key in keys:
        steps, y = series[key]
        ax.plot(steps, y, label=key, marker="." if len(steps) < 50 else None)
        values.append(y)
    flat = np.concatenate(values)
    flat = flat[np.isfinite(flat)]
    if match == "loss" and flat.size and flat.min() > 0 and flat.max() / flat.min() > 30:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(title.lower())
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------
def render(run_dir: Path, out_dir: Path) -> tuple[list[Path], list[str]]:
    """Write every figure the run has data for; returns (written files, notes on what was skipped)."""
    written: list[Path] = []
    notes: list[str] = []
    figures: dict[str, Figure | None] = {}

    metrics_files = find_files(run_dir, METRICS_FILE)
    if metrics_files:
        series = read_metrics_csv(metrics_files)
        figures["loss.png"] = curve_figure(series, "loss", "Loss")
        figures["accuracy.png"] = curve_figure(series, "acc", "Accuracy")
        if figures["accuracy.png"] is None:
            notes.append("accuracy.png: no accuracy column (e.g. val/acc1) in metrics.csv")
        if figures["loss.png"] is None:
            notes.append("loss.png: no loss column (e.g. train/loss) in metrics.csv")
    else:
        notes.append(f"loss.png, accuracy.png: no {METRICS_FILE} in {run_dir} (was the CSV logger on?)")

    depth_files = find_files(run_dir, DEPTH_FILE)
    records = [r for f in depth_files for r in read_depth_file(f)]
    if depth_files and not records:
        notes.append(f"grad_norm.png, gates.png, act_rms.png, error_flow.png: {depth_files[0]} is empty "
                     "(training stopped before the first measured step)")
    elif records:
        history = DepthHistory.from_records(records)
        figures["grad_norm.png"] = grad_norm_figure(history)
        figures["gates.png"] = gate_figure(history)
        figures["act_rms.png"] = act_rms_figure(history)
        figures["error_flow.png"] = error_flow_figure(history)
        figures["composite_gain.png"] = composite_gain_figure(records)  # None without multi-stream blocks
        if figures["gates.png"] is None:
            notes.append("gates.png: this model has no gates (plain or residual blocks)")
        if figures["grad_norm.png"] is None:
            notes.append("grad_norm.png: no gradient norms in depth.jsonl (DeepSpeed ZeRO runs do not record them)")
    else:
        notes.append(f"grad_norm.png, gates.png, act_rms.png, error_flow.png: no {DEPTH_FILE} in {run_dir} "
                     "(add deepres.observability.diagnostics.DepthDiagnostics to the trainer callbacks)")

    for name, fig in figures.items():
        if fig is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            fig.savefig(out_dir / name, dpi=110)
            written.append(out_dir / name)
    return written, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepres report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holding metrics.csv and depth.jsonl)")
    parser.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir
    if not run_dir.is_dir():
        print(f"deepres report: run directory {run_dir} does not exist. Pass the directory a training run "
              "wrote (runs/<name>/, the one holding metrics.csv and depth.jsonl).", file=sys.stderr)
        return 2
    out_dir = args.out if args.out is not None else run_dir / "report"
    written, notes = render(run_dir, out_dir)
    for note in notes:
        print(f"skipped {note}")
    if not written:
        print(f"deepres report: nothing to draw in {run_dir}: neither {METRICS_FILE} nor {DEPTH_FILE} has data. "
              "Is this the directory of a training run?", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
