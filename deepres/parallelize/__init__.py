"""Apply checkpointing, compilation and memory layout to a single-device model, from outside.

Order (as torchtitan): activation checkpointing → torch.compile → (Lightning applies the
strategy: DDP / DeepSpeed wrapping, after `configure_model`). Checkpointing comes first because
it decides which block boundaries keep their activations; compiling each block afterwards keeps
those boundaries as graph breaks, so compile sees one block at a time (fast to compile, and the
same compiled code serves every block of a stage); the strategy wraps last because DDP/ZeRO hook
the parameters of whatever module they are given.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from deepres.errors import ConfigError
from deepres.models.contract import blocks_of
from deepres.parallelize.activation_checkpoint import apply_activation_checkpointing

log = logging.getLogger("deepres")


def parallelize(
    net: nn.Module, *, activation_checkpointing: int | str = 0, compile: bool = False, channels_last: bool = False,
    memory_budget_gb: float | None = None, example_input: torch.Tensor | None = None, batch_size: int | None = None,
    decision: dict | None = None,
) -> str | None:
    """activation_checkpointing: 0/"none", k, "sqrt", "all", "selective", "selective:k", or "auto".
    "auto" needs memory_budget_gb (GB one training step may allocate beyond parameters and optimizer
    state), example_input (>= 2 training samples on the training device, e.g. the first rows of the
    first batch) and batch_size (the per-device training batch); it measures, sets the cheapest
    setting that fits (deepres.parallelize.memory_budget) and returns its name. Otherwise returns None.
    `decision`, if given, receives what ran: `chosen` (auto's setting), `segment` (blocks per checkpointed
    segment, 0 = none) and `predicted_peak_gb` (auto's prediction), for the run plan."""
    chosen = None
    if activation_checkpointing == "auto":
        if example_input is None or batch_size is None:
            raise ConfigError("activation_checkpointing: auto measures one step: parallelize() needs example_input "
                              "(a few training samples) and batch_size (the per-device batch).")
        from deepres.parallelize.memory_budget import choose_checkpointing

        choice = choose_checkpointing(net, example_input, batch_size, memory_budget_gb)
        chosen = choice.setting
        if decision is not None:
            decision.update(chosen=chosen, predicted_peak_gb=choice.predicted_peak_bytes / 2**30)
        if not torch.distributed.is_available() or not torch.distributed.is_initialized() \
                or torch.distributed.get_rank() == 0:
            log.info("activation_checkpointing auto: chose %r, predicted step peak %.3g GB at batch %d "
                     "(budget %.3g GB; predicted: %s)", chosen, choice.predicted_peak_bytes / 2**30, batch_size,
                     memory_budget_gb, ", ".join(f"{k} {v / 2**30:.3g} GB" for k, v in choice.predictions.items()))
    elif activation_checkpointing not in (0, "none", None):
        apply_activation_checkpointing(net, activation_checkpointing)
    if decision is not None:
        decision["segment"] = int(getattr(blocks_of(net), "checkpoint_every", 0) or 0)
    if compile:
        for block in net.blocks:
            block.compile()  # in place: parameter names (and checkpoints) stay the same
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return chosen
