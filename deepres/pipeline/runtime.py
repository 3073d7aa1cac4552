"""One process's share of a pipeline: its stage modules, torch's PipelineStage objects and the schedule.

`Pipeline.cut(net, ...)` keeps this rank's stages of `net` and replaces the rest by placeholders (before
the net moves to the device, so the other stages are never allocated there); `start(device, group)`
builds the stages and the schedule; `train_step(x, y)` runs forward and backward of every micro-batch
(gradients accumulate in `.grad`, divided by the micro-batch count, as the full-batch mean loss
would give them); `eval_step(x)` runs the forward-only schedule. The schedule science is in
docs/pipeline.md.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from deepres.pipeline.split import Layout, StageModule, check_cuttable, net_blocks, prune


@dataclass(frozen=True)
class ScheduleKind:
    cls: type
    style: str  # "single": one stage per rank; "loop"/"v": several (Layout.style)
    paper: str


SCHEDULES: dict[str, ScheduleKind] = {
    "gpipe": ScheduleKind(ScheduleGPipe, "single", "Huang et al. 2019"),
    "1f1b": ScheduleKind(Schedule1F1B, "single", "Narayanan et al. 2019 (PipeDream), 2021 (PipeDream-Flush)"),
    "interleaved_1f1b": ScheduleKind(ScheduleInterleaved1F1B, "loop", "Narayanan et al. 2021 (Megatron-LM)"),
    # ZB-1P on looped virtual stages. torch's V-shaped ZB-V (ScheduleZBVZeroBubble) is left out: its forward-only
    # `eval()` runs backward actions and fails in torch 2.14, so validation could not go through it.
    "zero_bubble": ScheduleKind(ScheduleInterleavedZeroBubble, "loop", "Qi et al. 2023 (ZB-1P)"),
}


def layout_for(schedule: str, ranks: int, virtual_stages: int) -> Layout:
    kind = SCHEDULES[schedule]
    if kind.style == "single":
        return Layout(ranks, 1, "loop")
    return Layout(ranks, 2 if kind.style == "v" else virtual_stages, kind.style)


class Pipeline:
    def __init__(self, modules: list[StageModule], indices: list[int], layout: Layout, pp_rank: int,
                 microbatches: int, schedule: str):
        self.modules, self.indices, self.layout, self.pp_rank = modules, indices, layout, pp_rank
        self.microbatches, self.schedule_name = microbatches, schedule
        self.has_first = 0 in indices
        self.has_last = layout.num_stages - 1 in indices
        self.schedule: Any = None
        self.evaluating = False
        self.group: dist.ProcessGroup | None = None

    @classmethod
    def cut(cls, net: nn.Module, *, ranges: list[tuple[int, int]], layout: Layout, pp_rank: int,
            microbatches: int, schedule: str) -> Pipeline:
        check_cuttable(net)
        net_blocks(net)
        indices = layout.stages_of(pp_rank)
        last = layout.num_stages - 1
        modules = [StageModule(net, *ranges[k], first=k == 0, last=k == last) for k in indices]
        owned = {i for k in indices for i in range(*ranges[k])}
        prune(net, owned, first=0 in indices, last=last in indices)
        return cls(modules, indices, layout, pp_rank, microbatches, schedule)

    def parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for module in self.modules:
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def start(self, device: torch.device, group: dist.ProcessGroup, loss_fn: Callable[[Any, Any], torch.Tensor]) -> None:
        self.group = group
        stages = [PipelineStage(m, stage_index=k, num_stages=self.layout.num_stages, device=device, group=group)
                  for m, k in zip(self.modules, self.indices, strict=True)]
        for stage, module in zip(stages, self.modules, strict=True):
            _mark_metadata_inference(stage, module)
        kind = SCHEDULES[self.schedule_name]
        target = stages[0] if kind.style == "single" else stages
        self.schedule = kind.cls(target, n_microbatches=self.microbatches, loss_fn=loss_fn, scale_grads=True)

    @property
    def inferring(self) -> bool:
        """Whether torch's schedule is inside its metadata inference (see `_mark_metadata_inference`)."""
        return any(m.inferring for m in self.modules)

    # -- steps ---------------------------------------------------------------------------------------
    def _inputs(self, x: Any, y: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.has_first:
            kwargs["arg_mbs"] = [(chunk,) for chunk in _split(x, self.microbatches)]
        if self.has_last and y is not None:
            kwargs["target_mbs"] = _split(y, self.microbatches)
        return kwargs

    def train_step(self, x: Any, y: Any, *, measure: bool = False) -> tuple[Any, list[torch.Tensor]]:
        """Forward and backward of every micro-batch; returns (the last stage's output, one loss per micro-batch)
        on the rank holding the last stage, else (None, [])."""
        for p in self.parameters():
            p.grad = None
        for module in self.modules:
            module.measure, module.grad_in_sq, module.grad_out_sq = measure, [], []
        losses: list[torch.Tensor] = []
        kwargs = self._inputs(x, y)
        if self.has_last:
            kwargs["losses"] = losses
        out = self.schedule.step(**kwargs, return_outputs=self.has_last)
        return (out if self.has_last else None), losses

    def eval_step(self, x: Any, y: Any) -> Any:
        """The forward-only schedule; the last stage's output on the rank holding it, else None. (torch's schedule
        computes the loss function on the last stage's micro-batches in eval too: `evaluating` tells it apart.)"""
        self.evaluating = True
        try:
            with torch.inference_mode(False), torch.no_grad():
                out = self.schedule.eval(**self._inputs(_clone(x) if self.has_first else None, y))
        finally:
            self.evaluating = False
        return out if self.has_last else None

    def boundary_grad_squares(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Σ over micro-batches of ‖∂L/∂x‖² at the blocks' input (first stage) and output (last stage)."""
        first = next((m.grad_in_sq for m in self.modules if m.first), None)
        last = next((m.grad_out_sq for m in self.modules if m.last), None)
        return self._step_total(first), self._step_total(last)

    @staticmethod
    def _step_total(values: list[torch.Tensor] | None) -> torch.Tensor | None:
        return torch.stack(values).sum() if values else None


# torch's PipelineStage learns the shapes the stages exchange by running one forward and backward of its own before
# the first step (torch >= 2.10: `_forward_metadata_inference` / `_backward_metadata_inference`; older releases: a
# forward-only `_shape_inference`). Those runs see micro-batch 0 again, or uninitialised tensors on later stages, and
# must not reach the diagnostics or the loss's metrics: the stage module is told while they run.
_INFERENCE_METHODS = ("_forward_metadata_inference", "_backward_metadata_inference", "_shape_inference")


def _mark_metadata_inference(stage: Any, module: StageModule) -> None:
    for name in _INFERENCE_METHODS:
        method = getattr(stage, name, None)
        if method is None:
            continue

        def marked(*args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            module.inferring = True
            try:
                return _method(*args, **kwargs)
            finally:
                module.inferring = False

        setattr(stage, name, marked)


def _split(x: Any, parts: int) -> list[Any]:
    if isinstance(x, torch.Tensor):
        return list(x.tensor_split(parts))
    if isinstance(x, (tuple, list)):
        return [type(x)(items) for items in zip(*(_split(item, parts) for item in x), strict=True)]
    raise TypeError(f"cannot split a {type(x).__name__} into micro-batches")


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, (tuple, list)):
        return type(x)(_clone(i) for i in x)
    return x


def bubble_fraction(stages: int, microbatches: int, virtual: int = 1) -> float:
    """The idle share of a step in GPipe and 1F1B, (S − 1)/(M + S − 1); interleaving v stages per rank
    divides the bubble by v: (S − 1)/(v·M + S − 1) (docs/pipeline.md)."""
    return (stages - 1) / (virtual * microbatches + stages - 1)
