"""Activation checkpointing applied to a model from outside.

`apply_activation_checkpointing(model, every=k)` makes the model's `blocks` keep only the input
of every k-th block in forward and recompute the k blocks in between during backward. Memory for
stored activations goes from O(L) to O(L/k + k), minimal at k ≈ √L ("sqrt"), for one extra
forward pass. Outputs, gradients and batch-norm running statistics are unchanged, and so are the
parameter names (checkpoints stay loadable either way), because the mechanism lives in
`deepres.models.BlockStack` and is only switched on here.

`selective=True` (the setting `selective`, or `selective:k` with any k above) keeps the outputs of
the matmuls and convolutions inside each segment and recomputes only the cheap ops between them
(norms, activations, gates, adds): most of the memory saving at a fraction of the recompute
(docs/science.md#selective-checkpointing). Implemented with
`torch.utils.checkpoint.create_selective_checkpoint_contexts`.
"""

from __future__ import annotations

import functools
import math
import threading

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts, noop_context_fn

from deepres.errors import ConfigError
from deepres.models.blocks import BlockStack, ResidualBlock
from deepres.models.contract import blocks_of
from deepres.models.reversible import ReversibleStack

aten = torch.ops.aten
# The expensive ops whose outputs selective checkpointing keeps (as torchtitan's op-level policy).
SAVED_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
             aten.convolution.default, aten._convolution.default}


class _Trailing(threading.local):
    depth = 0  # > 0 while a body's last layer runs: its output goes only into the merge


_trailing = _Trailing()


def selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep matmul/conv outputs, recompute everything else. The last layer of a body whose output
    autograd does not need (pre-activation bodies end in a conv or linear layer that feeds only the
    add) is recomputed too: keeping it would store one more full-width tensor per block for
    nothing, and backward never reruns it (checkpoint's early stop ends the recompute first)."""
    if op in SAVED_OPS and _trailing.depth == 0:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _enter_trailing(_module, _args):
    _trailing.depth += 1


def _leave_trailing(_module, _args, _out):
    _trailing.depth -= 1


def _mark_trailing_layers(blocks: BlockStack) -> None:
    for block in blocks:
        body = getattr(block, "body", None)
        if not isinstance(block, ResidualBlock) or not getattr(body, "output_not_saved", False):
            continue
        last = list(body.modules())[-1]
        if not getattr(last, "_deepres_trailing", False):
            last.register_forward_pre_hook(_enter_trailing)
            last.register_forward_hook(_leave_trailing, always_call=True)
            last._deepres_trailing = True


def parse_setting(setting: int | str | None) -> tuple[int | str, bool]:
    """`activation_checkpointing` → (every, selective): "selective" = every block, selectively;
    "selective:k" with k as for `every`."""
    if isinstance(setting, str) and setting.startswith("selective"):
        rest = setting.removeprefix("selective")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"activation_checkpointing {setting!r}: write 'selective' or 'selective:K' "
                              "(K an integer >= 1, 'sqrt' or 'all').")
        every = rest[1:] or 1
        return (int(every) if isinstance(every, str) and every.isdigit() else every), True
    return setting, False


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
        f"activation checkpointing `every` must be an integer >= 1, 'sqrt', 'all', 'selective', 'selective:K', "
        f"'auto' (with memory_budget_gb) or 0/'none'; got {every!r}."
    )


def apply_activation_checkpointing(model: nn.Module, every: int | str = "sqrt", selective: bool = False) -> int:
    """Checkpoint every `every` consecutive blocks of `model.blocks`; returns the interval used.
    `every` may also be "selective" / "selective:k" (then `selective` is implied)."""
    blocks = blocks_of(model)
    if not isinstance(blocks, BlockStack):
        raise ConfigError(
            f"{type(model).__name__} has no `blocks` BlockStack, so deepres cannot checkpoint it. "
            "Build models with deepres.models.create_model, or expose the repeated structure as a BlockStack."
        )
    every, implied = parse_setting(every)
    selective = selective or implied
    k = checkpoint_interval(len(blocks), every)
    if k and isinstance(blocks, ReversibleStack):
        raise ConfigError("a reversible stack stores no activations inside its reversible runs, so activation "
                          "checkpointing has nothing to save there. Use one of the two, not both.")
    blocks.checkpoint_every = k
    if selective and k:
        _mark_trailing_layers(blocks)
        blocks.checkpoint_context_fn = functools.partial(create_selective_checkpoint_contexts, selective_policy)
    else:
        blocks.checkpoint_context_fn = noop_context_fn
    return k
