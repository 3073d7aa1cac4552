"""Cutting a deepres net into pipeline stages at `net.blocks` boundaries (docs/pipeline.md).

A net is `exit(blocks(entry(x)))`: `entry` runs everything before the first block (the stem, a flatten),
`exit` everything after the last (the head). Stage 0 runs `entry` and the first run of blocks, the last
stage the last run of blocks and `exit`; the stages in between run blocks only. Where a model's forward
is a net's own `entry` and `exit` (the net contract, deepres.models.contract); a user's model that has
`blocks`, `entry` and `exit` is cut the same way.

How many blocks each stage gets (`balance`): by measured forward + backward time of each block on one
micro-batch (the default: blocks of a ResNet cost different amounts at different resolutions), by
parameter count, or an explicit list of block counts. The cut minimises the largest stage's cost
(`partition`), the stem's cost counted on the first stage and the head's on the last.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepres.errors import ConfigError
from deepres.models.blocks import BlockStack
from deepres.models.contract import blocks_of, is_deep_net

HEAD = "head"  # the child module that goes to the last stage; every other non-block child goes to the first


def check_cuttable(net: nn.Module) -> None:
    """Refuse a net that does not keep the net contract (deepres.models.contract): blocks, entry, exit."""
    if not is_deep_net(net):
        raise ConfigError(
            f"--trainer.strategy pipeline cannot cut a {type(net).__name__}: a net is cut at its `blocks`, and needs "
            "`entry(x)` (everything before the blocks) and `exit(y)` (everything after) methods, as deepres's own "
            "nets have (deepres.models.contract). Add them, or use --trainer.strategy ddp."
        )


def net_blocks(net: nn.Module) -> BlockStack:
    blocks = blocks_of(net)
    if not isinstance(blocks, BlockStack):
        raise ConfigError(
            f"--trainer.strategy pipeline cuts a net at its `blocks`, and {type(net).__name__} has no `blocks` "
            "BlockStack. Build the model with deepres.models.create_model, or use --trainer.strategy ddp."
        )
    return blocks


# ------------------------------------------------------------------------------------------------------
# Where the stages go
# ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """`ranks` pipeline ranks, each holding `per_rank` stages (`per_rank` > 1: interleaved/virtual stages).

    `style` "loop" puts stage k on rank k mod ranks (interleaved 1F1B), "v" folds the stages back
    (rank r holds r and 2·ranks − 1 − r, zero-bubble ZB-V), so the first and the last stage share rank 0."""

    ranks: int
    per_rank: int = 1
    style: str = "loop"

    @property
    def num_stages(self) -> int:
        return self.ranks * self.per_rank

    def rank_of(self, stage: int) -> int:
        if self.style == "v":
            lap, offset = divmod(stage, self.ranks)
            return offset if lap % 2 == 0 else self.ranks - 1 - offset
        return stage % self.ranks

    def stages_of(self, rank: int) -> list[int]:
        return [k for k in range(self.num_stages) if self.rank_of(k) == rank]


def partition(costs: Sequence[float], parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges of `costs`, one per part, each non-empty, minimising the largest sum.

    Binary search on that largest sum with a greedy fill (O(n log) rather than the O(parts·n²) dynamic
    programme, so 10,000 blocks cut at once)."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} blocks into {parts} non-empty stages")

    def fill(limit: float) -> list[tuple[int, int]] | None:
        ranges, start = [], 0
        for part in range(parts):
            end, total = start + 1, costs[start]
            if total > limit:
                return None
            # take more while it fits and every later part still gets at least one block
            while end < n - (parts - part - 1) and total + costs[end] <= limit:
                total += costs[end]
                end += 1
            if part == parts - 1 and end < n:
                return None
            ranges.append((start, end))
            start = end
        return ranges

    low, high = max(costs), float(sum(costs))
    for _ in range(60):
        mid = (low + high) / 2
        if fill(mid) is None:
            low = mid
        else:
            high = mid
    found = fill(high)
    assert found is not None
    return found


def parameter_costs(net: nn.Module) -> list[float]:
    """Per-block parameter counts; the stem's parameters count on block 0, the head's on the last block."""
    blocks = net_blocks(net)
    costs = [float(sum(p.numel() for p in b.parameters())) for b in blocks]
    for name, child in net.named_children():
        if child is blocks:
            continue
        size = float(sum(p.numel() for p in child.parameters()))
        costs[-1 if name == HEAD else 0] += size
    return [max(c, 1.0) for c in costs]


def measured_costs(net: nn.Module, sample: torch.Tensor, repeats: int = 3) -> list[float]:
    """Per-block forward + backward seconds on `sample` (one micro-batch), best of `repeats`; the stem's
    and the head's time count on the first and the last block. Runs in train mode without touching
    BatchNorm statistics or any `.grad`."""
    check_cuttable(net)
    blocks = net_blocks(net)
    saved = {m: (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    def timed(fn: Callable[[Any], Any], x: Any) -> tuple[Any, float]:
        best, out = float("inf"), None
        for _ in range(repeats):
            inputs = _detached(x)
            start = time.perf_counter()
            out = fn(inputs)
            tensors = [t for t in _tensors(out) if t.requires_grad]
            params = [p for p in fn_params(fn) if p.requires_grad]
            leaves = [t for t in _tensors(inputs) if t.requires_grad] + params
            if tensors and leaves:
                torch.autograd.grad([t.float().sum() for t in tensors], leaves, allow_unused=True)
            if sample.is_cuda:
                torch.cuda.synchronize(sample.device)
            best = min(best, time.perf_counter() - start)
        return _detached(out, grad=False), best

    def fn_params(fn: Callable[[Any], Any]) -> list[nn.Parameter]:
        return getattr(fn, "params", [])

    try:
        for m in saved:
            m.momentum = 0.0
        entry = _with_params(net.entry, [p for n, c in net.named_children()
                                                               if c is not blocks and n != HEAD for p in c.parameters()])
        x, stem_time = timed(entry, sample)
        costs = []
        for block in blocks:
            x, seconds = timed(_with_params(block, list(block.parameters())), x)
            costs.append(seconds)
        head = _with_params(net.exit, list(getattr(net, HEAD, nn.Identity()).parameters()))
        _, head_time = timed(head, x)
    finally:
        for m, (momentum, tracked) in saved.items():
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
    costs[0] += stem_time
    costs[-1] += head_time
    return costs


def _with_params(fn: Callable[[Any], Any], params: list[nn.Parameter]) -> Callable[[Any], Any]:
    def call(x: Any) -> Any:
        return fn(x)

    call.params = params  # type: ignore[attr-defined]
    return call


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for item in x for t in _tensors(item)]
    return []


def _contiguous(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.contiguous()
    if isinstance(x, tuple):
        return tuple(_contiguous(item) for item in x)
    return x


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _with_contiguous_grad(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return _ContiguousGrad.apply(x) if x.requires_grad else x
    if isinstance(x, tuple):
        return tuple(_with_contiguous_grad(item) for item in x)
    return x


def _detached(x: Any, grad: bool = True) -> Any:
    if isinstance(x, torch.Tensor):
        y = x.detach()
        return y.requires_grad_(True) if grad and y.is_floating_point() else y
    if isinstance(x, tuple):
        return tuple(_detached(item, grad) for item in x)
    return x


def block_ranges(net: nn.Module, num_stages: int, balance: str | Sequence[int],
                 sample: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """[start, end) of `net.blocks` for each stage."""
    blocks = net_blocks(net)
    if not isinstance(balance, str):
        counts = [int(c) for c in balance]
        if len(counts) != num_stages or any(c < 1 for c in counts) or sum(counts) != len(blocks):
            raise ConfigError(
                f"--trainer.strategy.balance {list(counts)}: give {num_stages} block counts (one per stage, each >= 1) "
                f"that add up to the net's {len(blocks)} blocks, or `time` / `params`."
            )
        starts = [sum(counts[:i]) for i in range(num_stages)]
        return [(s, s + c) for s, c in zip(starts, counts, strict=True)]
    if balance == "params":
        return partition(parameter_costs(net), num_stages)
    if balance == "time":
        if sample is None:
            raise ConfigError("--trainer.strategy.balance time needs the model's input shape (model.input_shape) to "
                              "time the blocks; use balance: params or an explicit list of block counts.")
        return partition(measured_costs(net, sample), num_stages)
    raise ConfigError(f"--trainer.strategy.balance {balance!r}: use time, params, or a list of block counts per stage.")


# ------------------------------------------------------------------------------------------------------
# The stage modules
# ------------------------------------------------------------------------------------------------------
class Elsewhere(nn.Module):
    """Stands where a block (or the stem, or the head) lives on another pipeline rank: no parameters, and a
    clear error if anything calls it."""

    def __init__(self, what: str):
        super().__init__()
        self.what = what

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.what} runs on another pipeline stage; this process holds only its own stages "
                           "(deepres.pipeline). Load last.ckpt into a one-device model to run the whole net.")

    def extra_repr(self) -> str:
        return self.what


def _stream(x: Any) -> Any:
    """The residual stream of a block's input or output; a depth-LSTM carries (u, h, c): h."""
    return x[1] if isinstance(x, tuple) else x


class StageModule(nn.Module):
    """One pipeline stage: `entry` (first stage), blocks[start:end], `exit` (last stage).

    It shares its modules with the net (parameter objects and all), so the optimizer, checkpoints and
    diagnostics keep seeing the net's own parameter names. With `measure` set it adds up ‖∂L/∂x‖² of the
    blocks' input (first stage) and output (last stage) over the micro-batches: the two ends of the
    error-flow ratio."""

    def __init__(self, net: nn.Module, start: int, end: int, *, first: bool, last: bool):
        super().__init__()
        blocks = net_blocks(net)
        self.__dict__["net"] = net  # not a submodule: the stage owns only its parts of it
        self.first, self.last, self.start, self.end = first, last, start, end
        # the same kind of stack as the net's: a ReversibleStack keeps its stage's blocks reversible
        self.blocks = type(blocks)([blocks[i] for i in range(start, end)])
        self.blocks.checkpoint_every = blocks.checkpoint_every
        self.ends = nn.ModuleDict({name: child for name, child in net.named_children() if child is not blocks
                                   and ((name == HEAD and last) or (name != HEAD and first))})
        self.measure = False
        # True while torch's schedule runs its metadata inference (a forward and backward before the first step, on
        # micro-batch 0 or on uninitialised tensors of its shape): nothing is measured or observed then
        self.inferring = False
        # ‖∂L/∂x‖² of each micro-batch's backward, in order (see Pipeline.boundary_grad_squares)
        self.grad_in_sq: list[torch.Tensor] = []
        self.grad_out_sq: list[torch.Tensor] = []

    def forward(self, *args: Any) -> Any:
        x = args[0] if len(args) == 1 else tuple(args)
        # the depth probe observes the net's stack (deepres.observability.depth_probe): report this stage's blocks
        # to it under their index in the whole net, so that activations and gates are measured on every stage
        # (a reversible stack has no observer: the probe hooks its blocks, which run here as they do in the net)
        observe, start = getattr(net_blocks(self.net), "observer", None), self.start
        if hasattr(self.blocks, "observer"):
            self.blocks.observer = None if observe is None or self.inferring else (lambda i, y: observe(start + i, y))
        try:
            return self._run(x)
        finally:
            if observe is not None and self.inferring:
                observe(None, None)  # the gates the metadata inference ran do not count either

    def _run(self, x: Any) -> Any:
        # torch's point-to-point sends take contiguous tensors only, and blocks may hand on others and give
        # their input others as gradient (multi-stream blocks: (B, C, n) by shape, laid out stream by stream)
        if self.first:
            x = self.net.entry(x)
            x = self._watch(x, "grad_in_sq")
        else:
            x = _with_contiguous_grad(x)
        x = self.blocks(x)
        if self.last:
            x = self._watch(x, "grad_out_sq")
            x = self.net.exit(x)
        else:
            x = _contiguous(x)
        return x

    def _watch(self, x: Any, key: str) -> Any:
        if not (self.measure and torch.is_grad_enabled()) or self.inferring:
            return x
        stream = _stream(x)
        if not isinstance(stream, torch.Tensor) or not stream.is_floating_point():
            return x
        if not stream.requires_grad:  # raw data enters the blocks directly (an LSTM over time)
            stream = stream.detach().requires_grad_(True)
            x = (x[0], stream, *x[2:]) if isinstance(x, tuple) else stream

        def add(grad: torch.Tensor) -> None:
            getattr(self, key).append(grad.detach().float().pow(2).sum())

        stream.register_hook(add)
        return x


def prune(net: nn.Module, owned: set[int], *, first: bool, last: bool) -> None:
    """Replace what this rank does not run by `Elsewhere` placeholders, so that its parameters, gradients and
    optimizer state are never allocated in this process."""
    blocks = net_blocks(net)
    for i in range(len(blocks)):
        if i not in owned:
            blocks[i] = Elsewhere(f"block {i}")
    for name, child in list(net.named_children()):
        if child is blocks:
            continue
        if (name == HEAD and not last) or (name != HEAD and not first):
            setattr(net, name, Elsewhere(f"net.{name}"))


def shared_across_stages(net: nn.Module, ranges: list[tuple[int, int]]) -> str | None:
    """The first parameter used by blocks of two different stages (shared weights cannot be cut), else None."""
    blocks = net_blocks(net)
    owner: dict[int, int] = {}
    for stage, (start, end) in enumerate(ranges):
        for i in range(start, end):
            for name, p in blocks[i].named_parameters():
                if owner.setdefault(id(p), stage) != stage:
                    return f"blocks.{i}.{name}"
    return None
