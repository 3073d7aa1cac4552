"""`activation_checkpointing: auto`: pick the cheapest checkpointing that fits a memory budget
(docs/science.md#choosing-checkpointing-from-a-memory-budget).

The budget (`memory_budget_gb`) is for what one training step allocates on top of the parameters
and optimizer state: stored activations, their gradients, the parameter gradients and temporaries.
`choose_checkpointing` measures that peak for each candidate, cheapest first (none → selective →
√L), by running one forward + backward at two small batch sizes taken from `example_input`, and
keeps the first candidate whose prediction at the training batch fits. The prediction is made per
allocation, not for the peak alone: a step makes the same allocations in the same order at any
batch size, each of a size fixed (parameter gradients) or linear in the batch (activations), so the
allocated total after the i-th event is a_i + b_i·batch; two probes give a_i and b_i, and the
predicted peak is max_i (a_i + b_i·batch). (The peak alone is not linear: at a small batch it comes at
the end of backward, when all parameter gradients exist; at a large one at its start, when all
activations do.) The totals are torch.profiler's memory events ("Total Allocated", CPU or the
accelerator), the allocator's own count. The probe leaves parameters, their .grad and batch-norm statistics as
they were.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from deepres.errors import ConfigError
from deepres.models.contract import blocks_of
from deepres.models.reversible import ReversibleStack
from deepres.parallelize.activation_checkpoint import apply_activation_checkpointing

log = logging.getLogger("deepres")
CANDIDATES = ("none", "selective", "sqrt")  # in order of step time: the first that fits wins


@dataclass
class Choice:
    setting: str
    predicted_peak_bytes: float
    predictions: dict[str, float]  # every candidate measured, bytes at the training batch


def step_peak_bytes(net: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes allocated during one forward + backward of `net` on `x` beyond what was allocated
    before it (gradients by torch.autograd.grad, so no .grad is touched)."""
    return max([0, *step_memory_timeline(net, x)])


def step_memory_timeline(net: nn.Module, x: torch.Tensor) -> list[int]:
    """Bytes allocated after each allocation or free during one forward + backward, in order."""
    params = [p for p in net.parameters() if p.requires_grad]
    device = x.device.type
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, profile_memory=True) as prof:
        out = net(x)
        out = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad(out.float().sum(), params, allow_unused=True)
        del out, grads
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    kind = 1 if device == "cuda" else 0  # kineto's device type: 0 CPU, 1 CUDA
    return [e["args"]["Total Allocated"] for e in events
            if e.get("name") == "[memory]" and e["args"].get("Device Type") == kind]


def predict_peak(timeline_1: list[int], b1: int, timeline_2: list[int], b2: int, batch: int) -> float:
    """max_i (a_i + s_i·batch) from the timelines at batches b1 < b2 (see the module docstring); if
    the two steps did not allocate alike, the peaks alone, extrapolated linearly."""
    if len(timeline_1) == len(timeline_2) and timeline_1:
        return max(t1 + (t2 - t1) * (batch - b1) / (b2 - b1) for t1, t2 in zip(timeline_1, timeline_2, strict=True))
    p1, p2 = max([0, *timeline_1]), max([0, *timeline_2])
    return p1 + (p2 - p1) * (batch - b1) / (b2 - b1)


def choose_checkpointing(net: nn.Module, example_input: torch.Tensor, batch_size: int,
                         memory_budget_gb: float) -> Choice:
    """Set the cheapest checkpointing whose predicted step peak at `batch_size` fits the budget.

    example_input: a few samples of the training input (at least 2 rows), on the training device.
    batch_size: the per-device training batch the prediction is for."""
    if memory_budget_gb is None or memory_budget_gb <= 0:
        raise ConfigError("activation_checkpointing: auto needs memory_budget_gb > 0 (the memory one training step "
                          f"may use for activations and gradients); got {memory_budget_gb!r}.")
    n = len(example_input)
    if n < 2:
        raise ConfigError("activation_checkpointing: auto measures two batch sizes and needs an example input of "
                          f"at least 2 samples; got {n}.")
    budget = memory_budget_gb * 2**30
    b1, b2 = max(1, n // 2), n
    candidates = ("none",) if isinstance(blocks_of(net), ReversibleStack) else CANDIDATES
    saved = {k: v.clone() for k, v in net.named_buffers()}  # batch-norm statistics
    predictions: dict[str, float] = {}
    try:
        for setting in candidates:
            apply_activation_checkpointing(net, 0 if setting == "none" else setting)
            t1 = step_memory_timeline(net, example_input[:b1])
            t2 = step_memory_timeline(net, example_input[:b2])
            predictions[setting] = predict_peak(t1, b1, t2, b2, batch_size)
            if predictions[setting] <= budget:
                break
    finally:
        with torch.no_grad():
            for k, v in net.named_buffers():
                v.copy_(saved[k])
    chosen = next((s for s, p in predictions.items() if p <= budget), None)
    if chosen is None:
        best = min(predictions, key=predictions.get)
        raise ConfigError(
            f"--model.memory.activation_checkpointing auto: no setting fits --model.memory.memory_budget_gb "
            f"{memory_budget_gb:g} at batch "
            f"{batch_size}; the smallest, {best!r}, is predicted to peak at {predictions[best] / 2**30:.2f} GB. "
            "Fix: a smaller per-device batch, more devices, reversible blocks (--model.reversible true), "
            "or a larger budget."
        )
    return Choice(chosen, predictions[chosen], predictions)
