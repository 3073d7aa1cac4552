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

What goes where, so that a 1000-block net stays usable:
  - every logger (CSV, wandb) gets the summaries over blocks (`.../min`, `/mean`, `/max`) and the
    per-block scalars of at most `log_blocks` evenly spaced blocks (first and last included);
  - a WandbLogger also gets block × step heatmaps (an image every `heatmap_every_n_steps` and at the end);
  - the full per-block arrays go to `depth.jsonl` in the run directory (one JSON line per sampled step,
    rank 0 only); `deepres report` draws its figures from it.

Forward hooks are attached only for the sampled steps' forward pass and removed before backward
(so activation-checkpoint recomputation does not count twice); the other steps run the bare model.

`diagnostics_callbacks(DiagnosticsConfig(...), run_dir)` builds both from the `diagnostics:` YAML section.

`PerfMonitor` logs step time, samples/s (overall and per device), the achieved model FLOP/s per
device and, given `peak_flops_per_device`, the model FLOP utilisation (MFU). FLOPs per sample come
from PyTorch's FlopCounterMode on a slice of the first batch (forward + backward).
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deepres.depth_figures import DEPTH_FILE, DepthHistory, gate_figure, grad_norm_figure, read_depth_file
from deepres.errors import ConfigError
from deepres.models.blocks import Gate, GateActivation

# Module attribute name -> the role of that gate in y = g(x)·x + t(x)·h(x)
# (docs/science.md#one-family-of-blocks). A `Gate` is hooked itself rather than its `act` (σ): a
# pinned gate skips σ and must still report its value.
GATE_ROLES = {
    "transform_gate": "transform",
    "input_gate": "transform",  # LSTM: c_t = f ⊙ c_{t−1} + i ⊙ z_t
    "carry_gate": "carry",
    "forget_gate": "carry",
}
_HEATMAP_COLUMNS = 1024  # in-memory history kept for wandb heatmaps; thinned by halves beyond this


def find_gates(blocks: nn.Module) -> list[tuple[str, nn.Module]]:
    """(role, module) for every distinct gate inside `blocks`, found by attribute name."""
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in blocks.named_modules(remove_duplicate=False):
        role = GATE_ROLES.get(name.rsplit(".", 1)[-1])
        if role is not None and isinstance(module, (Gate, GateActivation)):
            found.setdefault(id(module), (role, module))
    return list(found.values())


def block_key(index: int, num_blocks: int) -> str:
    """`block_017`: zero-padded to at least 3 digits so keys sort in block order."""
    return f"block_{index:0{max(3, len(str(num_blocks - 1)))}d}"


def spread(num_blocks: int, count: int) -> list[int]:
    """At most `count` evenly spaced block indices, always with the first and the last."""
    if count < 0 or count >= num_blocks:
        return list(range(num_blocks))
    if count == 0:
        return []
    if count == 1:
        return [num_blocks - 1]
    return sorted({round(i * (num_blocks - 1) / (count - 1)) for i in range(count)})


def _stream(x: Any) -> Any:
    """The residual stream of a block's input or output; a depth-LSTM carries (u, h, c): h."""
    return x[1] if isinstance(x, tuple) else x


def _batch_input(batch: Any) -> torch.Tensor | None:
    """The model input of a batch: the tensor itself, the first item of (x, y), or a dict's first tensor."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return _batch_input(batch[0])
    if isinstance(batch, dict):
        for value in batch.values():
            if isinstance(value, torch.Tensor):
                return value
    return None


def _net_blocks(pl_module: LightningModule) -> tuple[nn.Module, nn.Module] | None:
    net = getattr(pl_module, "net", None)
    blocks = getattr(net, "blocks", None)
    return (net, blocks) if isinstance(blocks, nn.Module) else None


def _is_zero_partitioned(trainer: Trainer) -> bool:
    """DeepSpeed ZeRO keeps gradients in its own partitioned buffers, not in `param.grad`."""
    return isinstance(trainer.strategy, DeepSpeedStrategy)


def _log(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    # Straight to the loggers: `self.log` would tie these to `log_every_n_steps` and costs ~50 µs a key.
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


# ----------------------------------------------------------------------------------------------
# One sampled step's forward hooks
# ----------------------------------------------------------------------------------------------
def _is_compiled(module: nn.Module) -> bool:
    """Whether any part of `module` runs through torch.compile (wrapped, or `Module.compile()` in place)."""
    return any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None)
               for m in module.modules())


class _Probe:
    """Forward hooks for one sampled step. Values stay on the device as 0-d tensors until `collect`,
    which moves them to the CPU in one transfer.

    A compiled model runs this one forward eagerly: compiled code does not call hooks added to
    submodules after compilation (dynamo does not guard on them), so gates would go unmeasured."""

    def __init__(self, blocks: nn.Module, gates: list[tuple[str, nn.Module]], eager: bool = False):
        self.stance = torch.compiler.set_stance("force_eager") if eager else None  # torch >= 2.6
        self.num_blocks = len(blocks)
        self.current = -1  # the block running now; gates report to it (also right for shared cells)
        self.values: dict[str, list[torch.Tensor]] = {"act_rms": []}
        self.owners: dict[str, list[int]] = {"act_rms": []}
        self.x_in: torch.Tensor | None = None
        self.x_out: torch.Tensor | None = None
        self.handles = [blocks.register_forward_pre_hook(self._keep_input),
                        blocks.register_forward_hook(self._keep_output)]
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._enter(i)))
            self.handles.append(block.register_forward_hook(self._record_activation))
        for role, module in gates:
            key = f"gate/{role}"
            self.values.setdefault(key, [])
            self.owners.setdefault(key, [])
            self.handles.append(module.register_forward_hook(self._record_gate(key)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.stance is not None:
            self.stance.__exit__(None, None, None)  # back to the stance before this step
            self.stance = None

    def _enter(self, index: int):
        def hook(_module, _args):
            self.current = index
        return hook

    def _record_activation(self, _module, _args, out) -> None:
        y = _stream(out)
        if isinstance(y, torch.Tensor):
            self.values["act_rms"].append(y.detach().float().pow(2).mean())
            self.owners["act_rms"].append(self.current)

    def _record_gate(self, key: str):
        def hook(_module, _args, out):
            if self.current >= 0:
                self.values[key].append(out.detach().float().mean())
                self.owners[key].append(self.current)
        return hook

    def _keep_input(self, _module, args):
        x0 = args[0]
        if isinstance(x0, torch.Tensor) and not x0.requires_grad:
            # Raw data enters the stack directly (an LSTM over time): make it a leaf that gets a .grad.
            x0 = x0.detach().requires_grad_(True)
            self.x_in = x0
            return (x0, *args[1:])
        stream = _stream(x0)
        if isinstance(stream, torch.Tensor) and stream.requires_grad:
            stream.retain_grad()
            self.x_in = stream
        return None

    def _keep_output(self, _module, _args, out) -> None:
        stream = _stream(out)
        if isinstance(stream, torch.Tensor) and stream.requires_grad:
            stream.retain_grad()
            self.x_out = stream

    def collect(self) -> dict[str, np.ndarray]:
        """Per-block means over every call of this step (LSTMs call a gate once per time step)."""
        arrays = {}
        for key, values in self.values.items():
            if not values:
                continue
            owners = torch.tensor(self.owners[key], device=values[0].device)
            sums = torch.zeros(self.num_blocks, device=values[0].device).index_add_(0, owners, torch.stack(values))
            counts = torch.bincount(owners, minlength=self.num_blocks).float()
            means = (sums / counts).cpu().numpy()  # 0/0 = NaN for a block without that gate
            arrays[key] = np.sqrt(means) if key == "act_rms" else means
        return arrays

    def error_flow_ratio(self) -> float:
        if self.x_in is None or self.x_out is None or self.x_in.grad is None or self.x_out.grad is None:
            return math.nan
        return float(self.x_in.grad.norm() / self.x_out.grad.norm())


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
        self.grad_norms = True
        self.latest: dict[str, np.ndarray] = {}  # the last sampled step's per-block arrays
        self.latest_error_flow_ratio = math.nan
        self._probe: _Probe | None = None
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
        self.enabled = trainer.is_global_zero
        self.gates = find_gates(blocks)
        self.num_blocks = len(blocks)
        self.compiled = _is_compiled(pl_module) and hasattr(torch.compiler, "set_stance")
        if _is_compiled(pl_module) and not self.compiled:
            rank_zero_warn("DepthDiagnostics: this torch has no torch.compiler.set_stance (torch < 2.6), so the "
                           "compiled model's gates and activations may not be measured; grad norms are.")
        self.block_params = [(i, p) for i, block in enumerate(blocks) for p in block.parameters() if p.requires_grad]
        if _is_zero_partitioned(trainer):
            self.grad_norms = False
            rank_zero_info("DepthDiagnostics: DeepSpeed ZeRO partitions gradients, so depth/grad_norm is not "
                           "logged; error flow, gate openness and activation norms are.")
        if self.run_dir is None:
            self.run_dir = Path(log_dir or trainer.default_root_dir)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After a resume the heatmaps continue from what the depth file already holds.
        if self.enabled and self.depth_path.exists():
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
            self._probe = _Probe(blocks, self.gates, eager=self.compiled)

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
        self.latest, self.latest_error_flow_ratio = arrays, ratio
        self._write(step, trainer.current_epoch, ratio, arrays)
        _log(trainer, self._metrics(ratio, arrays), step)
        self._history.add(step, arrays, self.num_blocks)
        if self.heatmap_every_n_steps and step > 0 and step % self.heatmap_every_n_steps < self.every_n_steps:
            self._log_heatmaps(trainer, step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        # A skipped optimizer step (e.g. manual optimisation that did not step) must not leave hooks behind.
        if self._probe is not None and not self._sampled(trainer):
            self._probe.remove()
            self._probe = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.enabled and self._history.steps:
            self._log_heatmaps(trainer, trainer.global_step)

    # -- measurements ----------------------------------------------------------------------------
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

    def _write(self, step: int, epoch: int, ratio: float, arrays: dict[str, np.ndarray]) -> None:
        def compact(values: np.ndarray) -> list[float | None]:
            return [float(f"{v:.4g}") if np.isfinite(v) else None for v in values.tolist()]

        record = {"step": step, "epoch": epoch, "error_flow_ratio": ratio if math.isfinite(ratio) else None}
        record.update({key: compact(values) for key, values in arrays.items()})
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
# Throughput and model FLOP utilisation
# ----------------------------------------------------------------------------------------------
def count_training_flops(net: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward + backward of `net` on `x` (PyTorch's FlopCounterMode: 2 per multiply-add).

    Runs in eval mode (no batch-norm statistics update, no dropout draw) and takes gradients with
    `torch.autograd.grad`, so no `.grad` is touched and no DDP all-reduce fires. Activation
    checkpointing and the recomputation of reversible blocks are switched off for the count: MFU
    counts the model's FLOPs, not recomputation.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    modes = {m: m.training for m in net.modules()}
    blocks = getattr(net, "blocks", None)
    every = getattr(blocks, "checkpoint_every", None)
    stored = getattr(blocks, "store_activations", None)  # deepres.models.reversible.ReversibleStack
    counter = FlopCounterMode(display=False)
    try:
        net.eval()
        if every is not None:
            blocks.checkpoint_every = 0
        if stored is not None:
            blocks.store_activations = True
        with counter, torch.enable_grad():
            out = net(x)
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    finally:
        for m, training in modes.items():
            m.training = training
        if every is not None:
            blocks.checkpoint_every = every
        if stored is not None:
            blocks.store_activations = stored
    return int(counter.get_total_flops())


class PerfMonitor(Callback):
    """perf/step_time_s, perf/samples_per_s, perf/samples_per_s_per_device, perf/flops_per_s_per_device,
    perf/mfu (with `peak_flops_per_device`), averaged over the last `every_n_steps` optimizer steps.

    Time spent in validation is left out; the first step (warm-up) is never timed.

    Args:
        every_n_steps: log every this many optimizer steps.
        peak_flops_per_device: the device's peak FLOP/s for the precision in use (e.g. 312e12 for an
            A100 in bf16); None: only the achieved FLOP/s is logged.
        flop_count_samples: samples of the first batch the FLOP count runs on (FLOPs scale linearly).
    """

    def __init__(self, every_n_steps: int = 50, peak_flops_per_device: float | None = None,
                 flop_count_samples: int = 4):
        if every_n_steps < 1:
            raise ConfigError(f"PerfMonitor every_n_steps must be >= 1; got {every_n_steps}.")
        if peak_flops_per_device is not None and not peak_flops_per_device > 0:
            raise ConfigError(f"PerfMonitor peak_flops_per_device must be a positive FLOP/s value "
                              f"(e.g. 312e12 for an A100 in bf16) or null; got {peak_flops_per_device}.")
        self.every_n_steps = every_n_steps
        self.peak_flops_per_device = peak_flops_per_device
        self.flop_count_samples = flop_count_samples
        self.flops_per_sample: float | None = None
        self._flops_tried = False
        self._window_start: float | None = None
        self._steps = 0
        self._samples = 0
        self._paused = 0.0
        self._pause_start: float | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        x = _batch_input(batch)
        if not self._flops_tried:
            self._flops_tried = True
            self.flops_per_sample = self._count_flops(trainer, pl_module, x)
        if self._window_start is not None and x is not None:
            self._samples += x.shape[0]

    def _count_flops(self, trainer: Trainer, pl_module: LightningModule, x: torch.Tensor | None) -> float | None:
        net = getattr(pl_module, "net", None)
        if x is None or not isinstance(net, nn.Module):
            rank_zero_warn("PerfMonitor: no `net` module or no tensor input in the batch; FLOPs and MFU are not logged.")
            return None
        if _is_zero_partitioned(trainer) and trainer.strategy.zero_stage_3:
            rank_zero_info("PerfMonitor: ZeRO stage 3 shards the parameters; FLOPs and MFU are not logged.")
            return None
        n = min(self.flop_count_samples, x.shape[0])
        try:
            return count_training_flops(net, x[:n]) / n
        except Exception as err:  # a model whose forward needs more than the batch input: skip, say why
            rank_zero_warn(f"PerfMonitor: could not count FLOPs with net(x) ({type(err).__name__}: {err}); "
                           "FLOPs and MFU are not logged.")
            return None

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if not trainer.is_global_zero:
            return
        now = time.perf_counter()
        if self._window_start is None:  # the end of the first step's backward starts the clock
            self._window_start = now
            return
        self._steps += 1
        step = trainer.global_step
        if step % self.every_n_steps or not self._samples:
            return
        elapsed = now - self._window_start - self._paused
        per_device = self._samples / elapsed
        metrics = {
            "perf/step_time_s": elapsed / self._steps,
            "perf/samples_per_s_per_device": per_device,
            "perf/samples_per_s": per_device * trainer.world_size,
        }
        if self.flops_per_sample is not None:
            achieved = self.flops_per_sample * per_device
            metrics["perf/flops_per_sample"] = self.flops_per_sample
            metrics["perf/flops_per_s_per_device"] = achieved
            if self.peak_flops_per_device:
                metrics["perf/mfu"] = achieved / self.peak_flops_per_device
        _log(trainer, metrics, step)
        self._window_start, self._steps, self._samples, self._paused = now, 0, 0, 0.0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pause_start is not None and self._window_start is not None:
            self._paused += time.perf_counter() - self._pause_start
        self._pause_start = None


# ----------------------------------------------------------------------------------------------
# The `diagnostics:` section of a deepres YAML
# ----------------------------------------------------------------------------------------------
@dataclass
class DiagnosticsConfig:
    """Depth diagnostics and throughput logging (deepres.diagnostics)."""

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
