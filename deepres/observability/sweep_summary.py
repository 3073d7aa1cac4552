"""``deepres sweep-summary SWEEP_DIR``: one table of a sweep's points and their final metrics, and a figure.

    deepres sweep-summary runs/depth-sweep                     # table on stdout, sweep_summary.{md,csv}
    deepres sweep-summary runs/depth-sweep --metric val/loss   # the metric the figure shows

Reads what ``deepres submit --sweep`` (sweep.json, one run directory per point) and each point's ``deepres fit``
(finished.json with the final metrics, run_info.json with one entry per start, metrics.csv) wrote; SLURM is not
asked, so it works on any copy of the directory. A point is

    finished     training reached its end (finished.json)
    incomplete   it has trained (metrics.csv) but not to the end: still running, requeued, failed or cancelled
    not started  nothing yet (pending in the queue, or never ran)

For a sweep of one key the figure is the metric against the key's values (a log axis when they are positive
numbers spanning 10x or more), the form of the depth plots in Srivastava et al. (2015), "Training Very Deep
Networks" (docs/science.md, "Depth sweeps").
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from deepres.errors import ConfigError
from deepres.slurm.sweep import load_sweep

PREFERRED = ("val/acc1", "val/loss", "train/loss", "train/acc1")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_step(metrics_csv: Path) -> int | None:
    try:
        with metrics_csv.open(newline="") as f:
            steps = [int(float(row["step"])) for row in csv.DictReader(f) if row.get("step")]
    except (OSError, KeyError, ValueError):
        return None
    return max(steps) if steps else None


def point_rows(sweep_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(sweep.json, one row per point: task, values, state, step, restarts, log, metrics)."""
    sweep = load_sweep(sweep_dir)
    rows = []
    for point in sweep["points"]:
        run_dir = sweep_dir / point["name"]
        finished = _read_json(run_dir / "finished.json")
        info = _read_json(run_dir / "run_info.json") or {}
        step = finished["global_step"] if finished else _last_step(run_dir / "metrics.csv")
        state = "finished" if finished else "incomplete" if step is not None else "not started"
        log = sweep_dir / f"slurm-{sweep.get('array_job', '*')}_{point['task']}.out"
        rows.append({
            "task": point["task"], "point": point["name"], **point["values"], "state": state,
            "step": step, "restarts": max(len(info.get("starts", [])) - 1, 0) if info else None,
            "log": str(log.relative_to(sweep_dir)), "metrics": (finished or {}).get("metrics", {}),
        })
    return sweep, rows


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    found = {k for r in rows for k in r["metrics"] if not k.startswith("depth/")}
    return [k for k in PREFERRED if k in found] + sorted(found - set(PREFERRED))


def _format(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(sweep: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    keys, metrics = sweep["keys"], metric_columns(rows)
    header = ["task", *keys, "state", "step", "restarts", *metrics]
    body = [[_format(r["task"]), *(r[k] for k in keys), r["state"], _format(r["step"]), _format(r["restarts"]),
             *(_format(r["metrics"].get(m)) for m in metrics)] for r in rows]
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in body)]) + "\n"


def _numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot(path: Path, sweep: dict[str, Any], rows: list[dict[str, Any]], metric: str) -> bool:
    """The metric against the one swept key's values; False (no figure) when no finished point has it."""
    key = sweep["keys"][0]
    done = [r for r in rows if metric in r["metrics"]]
    if not done:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r[key] for r in done]
    xs = _numbers(labels)
    ys = [r["metrics"][metric] for r in done]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if xs is not None:
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-")
        if min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
    else:
        ax.plot(range(len(labels)), ys, "o")
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} at the end of training, {len(done)} of {len(rows)} points", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepres sweep-summary", allow_abbrev=False,
                                     description="Tabulate the final metrics of a sweep's points.")
    parser.add_argument("sweep_dir", type=Path, help="the directory `deepres submit --sweep` wrote (runs/<name>)")
    parser.add_argument("--metric", help="metric for the figure of a one-key sweep (default: val/acc1 if logged)")
    parser.add_argument("--out", type=Path, help="where sweep_summary.{md,csv} and the figure go (default: SWEEP_DIR)")
    args = parser.parse_args(argv)
    try:
        sweep, rows = point_rows(args.sweep_dir)
    except ConfigError as err:
        print(f"deepres sweep-summary: {err}", file=sys.stderr)
        return 2
    header, body = table(sweep, rows)
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(header, body)
    (out / "sweep_summary.md").write_text(text)
    with (out / "sweep_summary.csv").open("w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    states = [r["state"] for r in rows]
    print(text + f"\n{states.count('finished')} of {len(rows)} points finished"
          f"{''.join(f', {states.count(s)} {s}' for s in ('incomplete', 'not started') if s in states)}. "
          f"Wrote {out / 'sweep_summary.md'}, {out / 'sweep_summary.csv'}")
    if len(sweep["keys"]) == 1:
        metrics = metric_columns(rows)
        metric = args.metric or (metrics[0] if metrics else None)
        if args.metric and args.metric not in metrics:
            print(f"deepres sweep-summary: no finished point logged {args.metric!r}; logged: "
                  f"{', '.join(metrics) or 'none yet'}.", file=sys.stderr)
            return 2
        if metric:
            figure = out / f"sweep_{metric.replace('/', '_')}.png"
            if plot(figure, sweep, rows, metric):
                print(f"Figure: {figure}")
    return 0
