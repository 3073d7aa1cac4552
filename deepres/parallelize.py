"""Apply checkpointing, compilation and memory layout to a single-device model, from outside.

Order (as torchtitan): activation checkpointing → torch.compile → (Lightning applies the
strategy: DDP / DeepSpeed wrapping, after `configure_model`). Checkpointing comes first because
it decides which block boundaries keep their activations; compiling each block afterwards keeps
those boundaries as graph breaks, so compile sees one block at a time (fast to compile, and the
same compiled code serves every block of a stage); the strategy wraps last because DDP/ZeRO hook
the parameters of whatever module they are given.
"""

from __future__ import annotations

import torch
from torch import nn

from deepres.activation_checkpoint import apply_activation_checkpointing


def parallelize(
    net: nn.Module, *, activation_checkpointing: int | str = 0, compile: bool = False, channels_last: bool = False
) -> None:
    if activation_checkpointing not in (0, "none", None):
        apply_activation_checkpointing(net, activation_checkpointing)
    if compile:
        for block in net.blocks:
            block.compile()  # in place: parameter names (and checkpoints) stay the same
    if channels_last:
        net.to(memory_format=torch.channels_last)
