"""Activation checkpointing applied to a model from outside.

`apply_activation_checkpointing(model, every=k)` makes the model's `blocks` keep only the input
of every k-th block in forward and recompute the k blocks in between during backward. Memory for
stored activations goes from O(L) to O(L/k + k), minimal at k ≈ √L ("sqrt"), for one extra
forward pass. Outputs, gradients and batch-norm running statistics are unchanged, and so are the
parameter names (checkpoints stay loadable either way), because the mechanism lives in
`deepres.models.BlockStack` and is only switched on here.
"""

from __future__ import annotations

import math

from torch import nn

from deepres.errors import ConfigError
from deepres.models.blocks import BlockStack
from deepres.models.reversible import ReversibleStack


def checkpoint_interval(num_blocks: int, every: int | str) -> int:
    """k for `every`: an int >= 1 (1 = every block, >= L = the whole stack as one segment),
    "sqrt" (≈ √L), or 0 / "none" (off)."""
    if every in (0, "none", None):
        return 0
    if every == "sqrt":
        return max(1, round(math.sqrt(num_blocks)))
    if every == "all":
        return num_blocks
    if isinstance(every, int) and every >= 1:
        return every
    raise ConfigError(
        f"activation checkpointing `every` must be an integer >= 1, 'sqrt', 'all' or 0/'none'; got {every!r}."
    )


def apply_activation_checkpointing(model: nn.Module, every: int | str = "sqrt") -> int:
    """Checkpoint every `every` consecutive blocks of `model.blocks`; returns the interval used."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, BlockStack):
        raise ConfigError(
            f"{type(model).__name__} has no `blocks` BlockStack, so deepres cannot checkpoint it. "
            "Build models with deepres.models.create_model, or expose the repeated structure as a BlockStack."
        )
    if isinstance(blocks, ReversibleStack):
        raise ConfigError("a reversible stack stores no activations inside its reversible runs, so activation "
                          "checkpointing has nothing to save there. Use one of the two, not both.")
    k = checkpoint_interval(len(blocks), every)
    blocks.checkpoint_every = k
    return k
