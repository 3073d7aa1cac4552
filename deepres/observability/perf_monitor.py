"""Throughput and model FLOP utilisation: `PerfMonitor` and `count_training_flops`.

`PerfMonitor` logs step time, samples/s (overall and per device), the achieved model FLOP/s per
device and, given `peak_flops_per_device`, the model FLOP utilisation (MFU). FLOPs per sample come
from PyTorch's FlopCounterMode on a slice of the first batch (forward + backward), counted once per
distinct block (`count_training_flops`), so the count costs a few blocks, not the whole stack.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deepres.errors import ConfigError
from deepres.models.contract import blocks_of, net_of


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

def is_zero_partitioned(trainer: Trainer) -> bool:
    """DeepSpeed ZeRO keeps gradients in its own partitioned buffers, not in `param.grad`."""
    return isinstance(trainer.strategy, DeepSpeedStrategy)

def log_metrics(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    # Straight to the loggers: `self.log` would tie these to `log_every_n_steps` and costs ~50 µs a key.
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


# ----------------------------------------------------------------------------------------------
# Model FLOPs
# ----------------------------------------------------------------------------------------------
def count_training_flops(net: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward + backward of `net` on `x` (PyTorch's FlopCounterMode: 2 per multiply-add).

    Runs in eval mode (no batch-norm statistics update, no dropout or drop-path draw) and takes
    gradients with `torch.autograd.grad`, so no `.grad` is touched and no DDP all-reduce fires.
    Activation checkpointing is switched off for the count: MFU counts the model's FLOPs, not
    recomputation.

    A model with a `blocks` stack is counted block by block: a block with the same structure and
    input shape as one already counted has the same FLOPs, so each distinct block runs once (with
    its own backward, to its input and parameters) and the others are added from that count. A
    10,000-block stack of one kind of block costs the count one block instead of 10,000 (the count
    through FlopCounterMode's module tracking grows faster than the stack)."""
    params = [p for p in net.parameters() if p.requires_grad]
    modes = {m: m.training for m in net.modules()}
    blocks = blocks_of(net)
    every = getattr(blocks, "checkpoint_every", None)
    # reversible blocks (deepres.models.reversible) are counted with stored activations, not the
    # recomputation of their inputs; their couplings are not counted block by block
    stored = getattr(blocks, "store_activations", None)
    counter = _totals_only(FlopCounterMode(display=False))
    blockwise = isinstance(blocks, nn.ModuleList) and len(blocks) > 1 and stored is None
    stack = _BlockwiseCount(blocks, counter) if blockwise else None
    try:
        if stored is not None:
            blocks.store_activations = True
        for m in modes:  # net.eval() without Module.__setattr__ per module
            m.__dict__["training"] = False
        if every is not None:
            blocks.checkpoint_every = 0
        if stack is not None:
            blocks.forward = stack  # an instance attribute: nn.Module.__call__ runs it instead of the class's
        with counter, torch.enable_grad():
            out = net(x)
            out = out[0] if isinstance(out, tuple) else out
            torch.autograd.grad(out.float().sum(), params, allow_unused=True)
    finally:
        if stack is not None:
            del blocks.forward
        for m, training in modes.items():
            m.__dict__["training"] = training
        if every is not None:
            blocks.checkpoint_every = every
        if stored is not None:
            blocks.store_activations = stored
    return int(counter.get_total_flops()) + (stack.skipped_flops if stack is not None else 0)


class _BlockwiseCount:
    """The block stack's forward during a FLOP count: each block's forward + backward counted on a
    detached input, repeated blocks added from the cache (see count_training_flops)."""

    def __init__(self, blocks: nn.ModuleList, counter: FlopCounterMode):
        self.blocks, self.counter = blocks, counter
        self.skipped_flops = 0

    def __call__(self, x, *args, **kwargs):
        if not isinstance(x, torch.Tensor) or args or kwargs:  # e.g. a depth-LSTM's (u, h, c): count it whole
            return type(self.blocks).forward(self.blocks, x, *args, **kwargs)
        cache: dict[tuple, tuple[int, torch.Tensor]] = {}
        h, needs_grad = x.detach(), x.requires_grad
        for block in self.blocks:
            block_params = [p for p in block.parameters() if p.requires_grad]
            key = (_signature(block), tuple(h.shape), h.dtype, needs_grad)
            hit = cache.get(key)
            if hit is None:
                before = self.counter.get_total_flops()
                h_in = h.detach().requires_grad_(needs_grad)
                out = block(h_in)
                wrt = ([h_in] if needs_grad else []) + block_params
                if wrt and out.requires_grad:
                    torch.autograd.grad(out.float().sum(), wrt, allow_unused=True)
                hit = cache[key] = (self.counter.get_total_flops() - before, out.detach())
            else:
                self.skipped_flops += hit[0]
            h = hit[1]
            needs_grad = needs_grad or bool(block_params)
        # keep the graph from the head back to the stem (their backward is counted by the caller);
        # a sum and a multiply by 0 are not FLOPs FlopCounterMode counts
        return h + 0.0 * x.sum() if x.requires_grad else h


class _GlobalOnly:
    """Stands in for FlopCounterMode's module tracker: only the "Global" total is wanted. The tracker
    hooks every module's forward and backward (a per-module cost that dominates a deep net's count)
    and refuses a nested `autograd.grad`, which the block-wise count uses."""

    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _totals_only(counter: FlopCounterMode) -> FlopCounterMode:
    # FlopCounterMode reads `mod_tracker.parents` for each counted op and enters/exits it with the mode
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _GlobalOnly()
    return counter


_PLAIN = (bool, int, str, type(None))


def _signature(block: nn.Module) -> tuple:
    """What decides a block's FLOPs for a given input shape: its module tree in walk order (types,
    child counts, extra_repr, simple attributes such as the gate kind or a pinned gate) and its
    parameter shapes. Reads each module's __dict__ directly: this runs once per block."""
    parts = []
    for m in block.modules():
        d = m.__dict__
        attrs = tuple((k, v if isinstance(v, _PLAIN) else type(v).__name__)
                      for k, v in d.items() if k[0] != "_" and k != "training")
        params = tuple((k, tuple(q.shape), q.requires_grad) for k, q in d["_parameters"].items() if q is not None)
        parts.append((type(m), len(d["_modules"]), m.extra_repr(), attrs, params))
    return tuple(parts)


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

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # A pipeline cuts the net into stages before the first batch, and no process keeps all of it: count the
        # whole net now, on random samples of the module's input shape (FLOPs depend on shapes only).
        shape = getattr(pl_module, "hparams", {}).get("input_shape")
        if stage == "fit" and _pipeline_stages(trainer) > 1 and trainer.is_global_zero and shape is not None:
            self._flops_tried = True
            self.flops_per_sample = self._count_flops(trainer, pl_module, torch.randn(self.flop_count_samples, *shape))

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
        net = net_of(pl_module)
        if x is None or net is None:
            rank_zero_warn("PerfMonitor: no `net` module or no tensor input in the batch; FLOPs and MFU are not logged.")
            return None
        if is_zero_partitioned(trainer) and trainer.strategy.zero_stage_3:
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
        # rank 0 sees its replica's batches; under a pipeline the stages of a replica share them
        total = self._samples / elapsed * trainer.world_size / _pipeline_stages(trainer)
        per_device = total / trainer.world_size
        metrics = {
            "perf/step_time_s": elapsed / self._steps,
            "perf/samples_per_s_per_device": per_device,
            "perf/samples_per_s": total,
        }
        if self.flops_per_sample is not None:
            achieved = self.flops_per_sample * per_device
            metrics["perf/flops_per_sample"] = self.flops_per_sample
            metrics["perf/flops_per_s_per_device"] = achieved
            if self.peak_flops_per_device:
                metrics["perf/mfu"] = achieved / self.peak_flops_per_device
        log_metrics(trainer, metrics, step)
        self._window_start, self._steps, self._samples, self._paused = now, 0, 0, 0.0

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause_start = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pause_start is not None and self._window_start is not None:
            self._paused += time.perf_counter() - self._pause_start
        self._pause_start = None


def _pipeline_stages(trainer: Trainer) -> int:
    """Processes per model replica: the pipeline's stages (deepres.pipeline.strategy), else 1."""
    return int(getattr(trainer.strategy, "pipeline_ranks", 1) or 1)
