"""The depth records of a run and the per-block figures drawn from them.

`deepres.observability.diagnostics.DepthDiagnostics` writes `depth.jsonl` (one JSON record per measured step) and
sends these figures to wandb as heatmaps; `deepres report` draws the same figures into PNGs. Both
import them from here, so the callback does not depend on the report command.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure

DEPTH_FILE = "depth.jsonl"
_MAX_COLUMNS = 600  # heatmap columns drawn; longer histories are strided (a 1000-px-wide image cannot show more)
GATE_LABELS = {
    "transform": "Transform gate openness t per block (highway: carry = 1 − t; LSTM: input gate)",
    "carry": "Carry gate openness g per block (gated blocks; LSTM: forget gate)",
}


# ----------------------------------------------------------------------------------------------
# Reading depth.jsonl
# ----------------------------------------------------------------------------------------------
def read_depth_file(path: Path) -> list[dict[str, Any]]:
    """Records of `depth.jsonl` sorted by step; after a resume the later line for a step wins."""
    by_step: dict[int, dict[str, Any]] = {}
    with Path(path).open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


@dataclass
class DepthHistory:
    """Per-block arrays over training: `arrays[key]` has shape (steps, blocks)."""

    steps: np.ndarray
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    error_flow: np.ndarray | None = None

    @classmethod
    def from_records(cls, records: list[dict[str, Any]]) -> DepthHistory:
        steps = np.array([r["step"] for r in records], dtype=np.int64)
        keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (list, np.ndarray))})
        num_blocks = max((len(r[k]) for r in records for k in keys if k in r), default=0)
        arrays = {}
        for key in keys:
            matrix = np.full((len(records), num_blocks), np.nan)
            for i, r in enumerate(records):
                if key in r:
                    values = np.asarray(r[key], dtype=float)  # None -> NaN
                    matrix[i, : len(values)] = values
            arrays[key] = matrix
        flow = np.array([np.nan if r.get("error_flow_ratio") is None else r["error_flow_ratio"] for r in records],
                        dtype=float)
        return cls(steps, arrays, flow if np.isfinite(flow).any() else None)

    @property
    def num_blocks(self) -> int:
        return next(iter(self.arrays.values())).shape[1] if self.arrays else 0

    def gate_roles(self) -> list[str]:
        return [role for role in GATE_LABELS if np.isfinite(self.arrays.get(f"gate/{role}", np.nan)).any()]


# ----------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------
def _robust_range(values: np.ndarray, positive: bool = False) -> tuple[float, float] | None:
    finite = values[np.isfinite(values)]
    if positive:
        finite = finite[finite > 0]
    if finite.size == 0:
        return None
    lo, hi = np.percentile(finite, [1, 99]) if finite.size >= 100 else (finite.min(), finite.max())
    if lo == hi:
        lo, hi = (lo / 2, hi * 2) if positive else (lo - 0.5, hi + 0.5)
    return float(lo), float(hi)


def _heatmap(fig: Figure, ax, steps: np.ndarray, matrix: np.ndarray, norm, label: str, cmap: str = "viridis"):
    """matrix (steps, blocks) drawn with block 0 (the input side) at the bottom."""
    stride = max(1, math.ceil(len(steps) / _MAX_COLUMNS))
    steps, matrix = steps[::stride], matrix[::stride]
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    image = ax.imshow(
        matrix.T, origin="lower", aspect="auto", interpolation="nearest", norm=norm,
        cmap=colormaps[cmap].with_extremes(bad="0.85"),  # NaN (grey): a block without this gate
        extent=(steps[0] - half, steps[-1] + half, -0.5, matrix.shape[1] - 0.5),
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("block  (0 = input side)")
    fig.colorbar(image, ax=ax, label=label)


def _profiles(ax, history: DepthHistory, matrix: np.ndarray, ylabel: str, log: bool) -> None:
    """The per-block profile at the first, middle and last sampled step."""
    blocks = np.arange(matrix.shape[1])
    picks = sorted({0, len(history.steps) // 2, len(history.steps) - 1})
    for i, color in zip(picks, ("tab:blue", "tab:orange", "tab:green"), strict=False):
        ax.plot(blocks, matrix[i], color=color, label=f"step {history.steps[i]}")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("block  (0 = input side)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _colour_scale(matrix: np.ndarray, prefer_log: bool) -> tuple[Normalize, bool] | None:
    """Log colours when the values are positive and span more than a decade, else a linear scale
    over the 1st–99th percentile (so small differences between blocks stay visible)."""
    if prefer_log:
        span = _robust_range(matrix, positive=True)
        if span is not None and span[1] / span[0] > 10:
            return LogNorm(*span), True
    span = _robust_range(matrix)
    return (Normalize(*span), False) if span is not None else None


def _depth_figure(history: DepthHistory, key: str, title: str, label: str, cmap: str = "viridis",
                  prefer_log: bool = True, fig: Figure | None = None, row=None) -> Figure | None:
    """Heatmap (block × step) on the left, per-block profiles at three steps on the right."""
    matrix = history.arrays.get(key)
    scale = None if matrix is None or len(history.steps) == 0 else _colour_scale(matrix, prefer_log)
    if scale is None:
        return None
    norm, log = scale
    if fig is None:
        fig = Figure(figsize=(12, 4.8), layout="constrained")
        row = fig.subplots(1, 2, width_ratios=(2.2, 1))
    heat, prof = row
    _heatmap(fig, heat, history.steps, matrix, norm, label + ("  (log scale)" if log else ""), cmap)
    heat.set_title(title)
    _profiles(prof, history, matrix, label, log)
    prof.set_title("per block at three steps")
    return fig


def grad_norm_figure(history: DepthHistory) -> Figure | None:
    return _depth_figure(history, "grad_norm", f"Gradient norm per block ({history.num_blocks} blocks)",
                         "‖∂L/∂θ_block‖")


def act_rms_figure(history: DepthHistory) -> Figure | None:
    return _depth_figure(history, "act_rms", f"Activation RMS per block ({history.num_blocks} blocks)",
                         "RMS of block output")


def _finite_mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def gate_figure(history: DepthHistory) -> Figure | None:
    """One row per gate role present, titled with the mean openness at the first and last step."""
    roles = history.gate_roles()
    if not roles:
        return None
    fig = Figure(figsize=(12, 4.8 * len(roles)), layout="constrained")
    rows = np.atleast_2d(fig.subplots(len(roles), 2, width_ratios=(2.2, 1)))
    for row, role in zip(rows, roles, strict=True):
        matrix = history.arrays[f"gate/{role}"]
        first, last = _finite_mean(matrix[0]), _finite_mean(matrix[-1])
        title = (f"{GATE_LABELS[role]}\nmean over blocks {first:.3g} at step {history.steps[0]} → "
                 f"{last:.3g} at step {history.steps[-1]}")
        _depth_figure(history, f"gate/{role}", title, f"mean {role} gate openness", cmap="magma",
                      fig=fig, row=row)
    return fig


def error_flow_figure(history: DepthHistory) -> Figure | None:
    if history.error_flow is None:
        return None
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(history.steps, history.error_flow, marker=".", color="tab:blue")
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1, label="1.0: undiminished")
    positive = history.error_flow[np.isfinite(history.error_flow) & (history.error_flow > 0)]
    if positive.size and max(positive.max(), 1.0) / positive.min() > 10:
        ax.set_yscale("log")
    else:
        ax.set_ylim(0, max(1.1, float(np.nanmax(history.error_flow)) * 1.05))
    ax.set_xlabel("training step")
    ax.set_ylabel("‖∂L/∂x₀‖ / ‖∂L/∂x_L‖")
    ax.set_title(f"Error flow from the last block to the first ({history.num_blocks} blocks)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


COMPOSITE_KEYS = {  # depth.jsonl key of the multi-stream blocks' ∏H^res (deepres.models.hyper) → its label
    "hyper/composite/max_row_sum": "max |row sum| (forward gain)",
    "hyper/composite/max_col_sum": "max |column sum| (backward gain)",
    "hyper/composite/min_col_sum": "min column sum",
}


def composite_gain_figure(records: list[dict[str, Any]]) -> Figure | None:
    """The composite gain of the stream mixings over training: the row and column sums of ∏H^res over all
    blocks, 1 where the product is doubly stochastic, and max |log column sum| (attenuation and
    amplification alike). None for a run without multi-stream blocks."""
    rows = [r for r in records if any(r.get(k) is not None for k in COMPOSITE_KEYS)]
    if not rows:
        return None
    steps = [r["step"] for r in rows]

    def series(key: str) -> np.ndarray:
        return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)

    fig = Figure(figsize=(10, 4), layout="constrained")
    sums, logs = fig.subplots(1, 2)
    for key, label in COMPOSITE_KEYS.items():
        sums.plot(steps, series(key), marker=".", label=label)
    sums.axhline(1.0, color="0.4", linestyle="--", linewidth=1)
    values = np.concatenate([series(k) for k in COMPOSITE_KEYS])
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size and positive.max() / positive.min() > 10:
        sums.set_yscale("log")
    sums.set_xlabel("training step")
    sums.set_title("∏H^res over all blocks: row and column sums")
    sums.legend(fontsize=8)
    sums.grid(alpha=0.3, which="both")
    logs.plot(steps, series("hyper/composite/max_abs_log_col_sum"), marker=".", color="tab:red")
    logs.set_xlabel("training step")
    logs.set_title("max |log column sum| of ∏H^res (0: no drift)")
    logs.grid(alpha=0.3, which="both")
    return fig
