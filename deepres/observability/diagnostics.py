"""Depth diagnostics and throughput as Lightning callbacks, cheap enough to leave on.

`DepthDiagnostics` answers the question a very deep net raises: does the error still reach the
first block, and what are the gates doing? Every `every_n_steps` optimizer steps it measures, for
each block of `pl_module.net.blocks` (docs/science.md#measuring-error-flow):

    depth/grad_norm/block_017        ‖∂L/∂θ‖ over the block's parameters (after backward, before the step)
    depth/act_rms/block_017          root-mean-square of the block's output
    depth/gate/transform/block_017   mean transform-gate openness t (highway/gated; LSTM input gate)
    depth/gate/carry/block_017       mean carry-gate openness g (gated; LSTM forget gate)
    depth/error_flow_ratio           ‖∂L/∂x₀‖ / ‖∂L/∂x_L‖ at the stack's input and output
                                     (1.0: the error reaches the first block undiminished)
    depth/hyper/...                  multi-stream blocks: each H^res's max row/column sum and max |log column
                                     sum|, and `hyper/composite/...` of the product ∏H^res (deepres.models.hyper)

What goes where, so that a 1000-block net stays usable:
  - every logger (CSV, wandb) gets the summaries over blocks (`.../min`, `/mean`, `/max`) and the
    per-block scalars of at most `log_blocks` evenly spaced blocks (first and last included);
  - a WandbLogger also gets block × step heatmaps (an image every `heatmap_every_n_steps` and at the end);
  - the full per-block arrays go to `depth.jsonl` in the run directory (one JSON line per sampled step,
    rank 0 only); `deepres report` draws its figures from it.

The probe (deepres.observability.depth_probe: the stack's observer, one call per block, and a hook per gate) is
attached only for the sampled steps' forward pass and removed before backward (so activation-checkpoint
recomputation does not count twice); the other steps run the bare model.

`diagnostics_callbacks(DiagnosticsConfig(...), run_dir)` builds both from the `diagnostics:` YAML section,
with `PerfMonitor` (deepres.observability.perf_monitor: step time, samples/s, FLOP/s, MFU). What one measured step
records lives in deepres.observability.depth_probe.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from deepres.errors import ConfigError
from deepres.models.contract import blocks_of, net_of
from deepres.observability.depth_figures import (
    DEPTH_FILE,
    DepthHistory,
    gate_figure,
    grad_norm_figure,
    read_depth_file,
)
from deepres.observability.depth_probe import GATE_ROLES, Probe, block_key, find_gates, is_compiled, spread
from deepres.observability.perf_monitor import (
    PerfMonitor,
    count_training_flops,
    is_zero_partitioned,
    log_metrics,
)

__all__ = [
    "DEPTH_FILE", "GATE_ROLES", "DepthDiagnostics", "DiagnosticsConfig", "PerfMonitor", "block_key",
    "count_training_flops", "diagnostics_callbacks", "find_gates", "spread",
]

_HEATMAP_COLUMNS = 1024  # in-memory history kept for wandb heatmaps; thinned by halves beyond this


def _net_blocks(pl_module: LightningModule) -> tuple[nn.Module, nn.Module] | None:
    net, blocks = net_of(pl_module), blocks_of(pl_module)
    return (net, blocks) if blocks is not None else None


# ----------------------------------------------------------------------------------------------
# Depth diagnostics
# ----------------------------------------------------------------------------------------------
@dataclass
class _History:
    """What the wandb heatmaps are drawn from: float32 columns, thinned by halves when too many."""

    steps: list[int] = field(default_factory=list)
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, step: int, arrays: dict[str, np.ndarray], num_blocks: int) -> None:
        # A key missing at some step (or appearing late) gets NaN columns so all columns line up.
        missing = np.full(num_blocks, np.nan, dtype=np.float32)
        for key in arrays.keys() - self.arrays.keys():
            self.arrays[key] = [missing] * len(self.steps)
        for key, column in self.arrays.items():
            column.append(arrays[key].astype(np.float32) if key in arrays else missing)
        self.steps.append(step)
        if len(self.steps) > _HEATMAP_COLUMNS:
            self.steps = self.steps[::2]
            self.arrays = {k: v[::2] for k, v in self.arrays.items()}

    def records(self) -> list[dict[str, Any]]:
        return [{"step": s, **{k: v[i] for k, v in self.arrays.items()}} for i, s in enumerate(self.steps)]


class DepthDiagnostics(Callback):
    """Per-block gradient norms, gate openness, activation RMS and the error-flow ratio (see module doc).

    Args:
        every_n_steps: measure every this many optimizer steps (step 0, the initialisation, included).
        log_blocks: per-block scalars go to the loggers for at most this many evenly spaced blocks
            (-1: all; 0: summaries only). The depth file always has every block.
        heatmap_every_n_steps: with a WandbLogger, log block × step heatmap images this often
            (0: only at the end of training).
        run_dir: where `depth.jsonl` goes; None: the trainer's log_dir.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        log_blocks: int = 16,
        heatmap_every_n_steps: int = 1000,
        run_dir: str | Path | None = None,
    ):
        if every_n_steps < 1:
            raise ConfigError(f"DepthDiagnostics every_n_steps must be >= 1; got {every_n_steps}.")
        if heatmap_every_n_steps < 0:
            raise ConfigError(f"DepthDiagnostics heatmap_every_n_steps must be >= 0; got {heatmap_every_n_steps}.")
        self.every_n_steps = every_n_steps
        self.log_blocks = log_blocks
        self.heatmap_every_n_steps = heatmap_every_n_steps
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.enabled = False
        self.gather: Any = None
        self.grad_norms = True
        self.latest: dict[str, np.ndarray] = {}  # the last sampled step's per-block arrays
        self.latest_error_flow_ratio = math.nan
        self.latest_composite: dict[str, float] = {}  # multi-stream blocks: the gains of ∏H^res at that step
        self._probe: Probe | None = None
        self._history = _History()
        self._warned: set[str] = set()

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        # trainer.log_dir broadcasts from rank 0, so every rank asks for it.
        log_dir = trainer.log_dir
        found = _net_blocks(pl_module)
        if found is None:
            rank_zero_warn("DepthDiagnostics is off: the LightningModule has no `net.blocks` to walk "
                           "(deepres models expose their blocks as `model.blocks`; keep the model as `self.net`).")
            return
        _, blocks = found
        # Under pipeline parallelism the blocks live on several ranks: every rank measures its own and the
        # strategy gathers them on rank 0 (`gather_depth_measurements`, deepres.pipeline.strategy).
        self.gather = getattr(trainer.strategy, "gather_depth_measurements", None)
        # Under data parallelism (DDP, ZeRO) each rank sees its part of the batch: every rank measures it and the
        # values are combined over the ranks, so that they mean what one process on the whole batch measures.
        self.data_parallel = trainer.world_size > 1 and not callable(self.gather)
        self.enabled = trainer.is_global_zero or callable(self.gather) or self.data_parallel
        self.gates = find_gates(blocks)
        self.num_blocks = len(blocks)
        self.compiled = is_compiled(pl_module) and hasattr(torch.compiler, "set_stance")
        if is_compiled(pl_module) and not self.compiled:
            rank_zero_warn("DepthDiagnostics: this torch has no torch.compiler.set_stance (torch < 2.6), so the "
                           "compiled model's gates and activations may not be measured; grad norms are.")
        self.block_params = [(i, p) for i, block in enumerate(blocks) for p in block.parameters() if p.requires_grad]
        if is_zero_partitioned(trainer):
            self.grad_norms = False
            rank_zero_info("DepthDiagnostics: DeepSpeed ZeRO partitions gradients, so depth/grad_norm is not "
                           "logged; error flow, gate openness and activation norms are.")
        if self.run_dir is None:
            self.run_dir = Path(log_dir or trainer.default_root_dir)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if callable(self.gather):  # the strategy has cut the net since `setup`: keep only this rank's blocks
            _, blocks = _net_blocks(pl_module)
            self.gates = find_gates(blocks)
            self.block_params = [(i, p) for i, block in enumerate(blocks) for p in block.parameters()
                                 if p.requires_grad]
        # After a resume the heatmaps continue from what the depth file already holds.
        if self.enabled and trainer.is_global_zero and self.depth_path.exists():
            for record in read_depth_file(self.depth_path):
                if record["step"] < trainer.global_step:
                    arrays = {k: np.asarray(v, dtype=np.float32) for k, v in record.items() if isinstance(v, list)}
                    self._history.add(record["step"], arrays, self.num_blocks)

    @property
    def depth_path(self) -> Path:
        assert self.run_dir is not None
        return self.run_dir / DEPTH_FILE

    # -- the sampled step ------------------------------------------------------------------------
    def _sampled(self, trainer: Trainer) -> bool:
        return self.enabled and trainer.global_step % self.every_n_steps == 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._sampled(trainer) and self._probe is None:
            _, blocks = _net_blocks(pl_module)
            self._probe = Probe(blocks, self.gates, eager=self.compiled)

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        if self._probe is not None:
            self._probe.remove()  # values and retained tensors stay; recomputation in backward is not counted

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self._probe is None:
            return
        probe, self._probe = self._probe, None
        probe.remove()
        step = trainer.global_step
        arrays = probe.collect()
        if self.grad_norms:
            norms = self._grad_norms()
            if norms is not None:
                arrays["grad_norm"] = norms
        ratio = probe.error_flow_ratio()
        if self.data_parallel:
            arrays, ratio = self._combined_over_ranks(trainer, probe, arrays)
            if not trainer.is_global_zero:
                return
        if callable(self.gather):
            gathered = self.gather(arrays)
            if gathered is None:  # not rank 0: its blocks' values went there
                return
            arrays, ratio = gathered
        self.latest, self.latest_error_flow_ratio, self.latest_composite = arrays, ratio, probe.composite
        self._write(step, trainer.current_epoch, ratio, arrays, probe.composite)
        log_metrics(trainer, {**self._metrics(ratio, arrays), **{f"depth/{k}": v for k, v in probe.composite.items()}},
                    step)
        self._history.add(step, arrays, self.num_blocks)
        if self.heatmap_every_n_steps and step > 0 and step % self.heatmap_every_n_steps < self.every_n_steps:
            self._log_heatmaps(trainer, step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        # A skipped optimizer step (e.g. manual optimisation that did not step) must not leave hooks behind.
        if self._probe is not None and not self._sampled(trainer):
            self._probe.remove()
            self._probe = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and trainer.is_global_zero and self._history.steps:
            self._log_heatmaps(trainer, trainer.global_step)

    # -- measurements ----------------------------------------------------------------------------
    def _combined_over_ranks(self, trainer: Trainer, probe: Probe,
                             arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """The whole batch's values from every rank's part (equal parts, as deepres's samplers give): activation
        RMS as the root of the mean square, gates as the mean, the error-flow ratio from the summed squares of the
        boundary gradients. Gradient norms are left as they are (DDP has already all-reduced the gradients)."""
        keys = [k for k in sorted(arrays) if k != "grad_norm"]
        g_in, g_out = probe.boundary_grad_squares()
        parts = [np.array([g_in, g_out], dtype=np.float64)]
        for key in keys:
            values = np.asarray(arrays[key], dtype=np.float64)
            parts.append(np.square(values) if key == "act_rms" else values)
        flat = np.concatenate(parts)
        known = np.isfinite(flat)
        both = torch.from_numpy(np.stack([np.where(known, flat, 0.0), known.astype(np.float64)]))
        both = trainer.strategy.reduce(both.to(trainer.strategy.root_device), reduce_op="sum").cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            sums, counts = both[0], both[1]
            means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        combined = dict(arrays)
        offset = 2
        for key in keys:
            n = len(arrays[key])
            values = means[offset:offset + n]
            combined[key] = (np.sqrt(values) if key == "act_rms" else values).astype(np.float32)
            offset += n
        ratio = math.sqrt(sums[0] / sums[1]) if counts[0] and counts[1] and sums[1] > 0 else math.nan
        return combined, ratio

    def _grad_norms(self) -> np.ndarray | None:
        """‖grad‖ per block. Under DDP the gradients are already all-reduced when this runs."""
        owners, grads = [], []
        for i, p in self.block_params:
            if p.grad is not None:
                owners.append(i)
                grads.append(p.grad)
        if not grads:
            self._warn_once("no_grads", "DepthDiagnostics: no block parameter has a .grad at "
                            "on_before_optimizer_step (frozen blocks or a strategy that keeps gradients "
                            "elsewhere); depth/grad_norm is not logged.")
            return None
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
        num_blocks = self.num_blocks
        index = torch.tensor(owners, device=norms.device)
        squares = torch.zeros(num_blocks, device=norms.device).index_add_(0, index, norms.square())
        counts = torch.bincount(index, minlength=num_blocks)
        squares[counts == 0] = math.nan
        return squares.sqrt().cpu().numpy()

    def _metrics(self, ratio: float, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        metrics = {"depth/error_flow_ratio": ratio}
        for key, values in arrays.items():
            finite = values[np.isfinite(values)]
            if finite.size == 0:
                continue
            metrics[f"depth/{key}/min"] = float(finite.min())
            metrics[f"depth/{key}/mean"] = float(finite.mean())
            metrics[f"depth/{key}/max"] = float(finite.max())
            for i in spread(len(values), self.log_blocks):
                if np.isfinite(values[i]):
                    metrics[f"depth/{key}/{block_key(i, len(values))}"] = float(values[i])
        return metrics

    def _write(self, step: int, epoch: int, ratio: float, arrays: dict[str, np.ndarray],
               scalars: dict[str, float] | None = None) -> None:
        def compact(values: np.ndarray) -> list[float | None]:
            return [float(f"{v:.4g}") if np.isfinite(v) else None for v in values.tolist()]

        record = {"step": step, "epoch": epoch, "error_flow_ratio": ratio if math.isfinite(ratio) else None}
        record.update({key: compact(values) for key, values in arrays.items()})
        record.update({key: value if math.isfinite(value) else None for key, value in (scalars or {}).items()})
        self.depth_path.parent.mkdir(parents=True, exist_ok=True)
        with self.depth_path.open("a") as f:  # append + close: a crash loses at most the line being written
            f.write(json.dumps(record) + "\n")

    def _log_heatmaps(self, trainer: Trainer, step: int) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb
        from PIL import Image

        history = DepthHistory.from_records(self._history.records())
        figures = {"depth/heatmap/grad_norm": grad_norm_figure(history),
                   "depth/heatmap/gates": gate_figure(history)}
        images = {}
        for key, fig in figures.items():
            if fig is None:
                continue
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=80)
            images[key] = wandb.Image(Image.open(buffer))
        if images:
            for logger in loggers:
                logger.log_metrics(images, step=step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

# ----------------------------------------------------------------------------------------------
# The `diagnostics:` section of a deepres YAML
# ----------------------------------------------------------------------------------------------
@dataclass
class DiagnosticsConfig:
    """Depth diagnostics and throughput logging (deepres.observability.diagnostics)."""

    enabled: bool = True
    """Log depth/… and perf/… metrics. They cost about 1 % of step time at the default interval."""
    every_n_steps: int = 50
    """Measure every this many optimizer steps (step 0, the initialisation, included)."""
    log_blocks: int = 16
    """Per-block scalars go to the loggers for at most this many evenly spaced blocks (-1: all);
    depth.jsonl in the run directory always holds every block."""
    heatmap_every_n_steps: int = 1000
    """With wandb on, log block × step heatmap images this often (0: only at the end)."""
    peak_flops_per_device: float | None = None
    """Peak FLOP/s of one device in the precision used (e.g. 312e12 for an A100 in bf16) for perf/mfu;
    null: only the achieved FLOP/s is logged."""


def diagnostics_callbacks(cfg: DiagnosticsConfig, run_dir: str | Path | None = None) -> list[Callback]:
    """The callbacks for `cfg`; depth.jsonl goes to `run_dir` (None: the trainer's log_dir)."""
    if not cfg.enabled:
        return []
    # PerfMonitor first: its one-off FLOP-counting forward (in on_train_batch_start) must run before
    # DepthDiagnostics attaches its hooks for that step, or the extra forward would be measured too.
    return [
        PerfMonitor(every_n_steps=cfg.every_n_steps, peak_flops_per_device=cfg.peak_flops_per_device),
        DepthDiagnostics(every_n_steps=cfg.every_n_steps, log_blocks=cfg.log_blocks,
                         heatmap_every_n_steps=cfg.heatmap_every_n_steps, run_dir=run_dir),
    ]
