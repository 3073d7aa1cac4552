"""Depth parameterisation: one set of hyper-parameters from 10 to 10,000 blocks.

`depth_scaling="completep"` is the α = 1 depth rule of CompleteP (Dey et al. 2025, Table 1; Bordelon et al.
2024 for the SGD form), applied to every block of the residual family y = g(x)·s + t(x)·h(x)
(deepres/models/blocks.py); derivation in docs/science.md#depth-parameterisation-completep.

With L blocks of which each merges its input s and its output y_merge, the block becomes

    y = s + (1/L)·(y_merge − s)

a fixed, non-learned multiplier on the change the block makes: residual y = s + h(x)/L; highway
y = s + (t(x)/L)·(h(x) − s), i.e. the transform gate scaled by 1/L; gated y = s + (g(x)·s + t(x)·h(x) − s)/L;
the multi-stream members (deepres.models.hyper) H' = H + (H^res H + H^post ⊗ h − H)/L, i.e. the stream mixing
((1 − 1/L)·I + H^res/L, doubly stochastic again where H^res is) and H^post both scaled towards the identity.
Depth-dependent initial values are then resolved for one block (`init_blocks`): the `auto` gate biases
(−1 for a highway transform gate, +1 for a carry gate) and the presets' scales (LayerScale's ε = 0.1): the
1/L multiplier already does what the depth-aware bias −ln(L) − 1 or ε(L) do without the switch.

Every parameter inside a scaled block ("hidden") gets the matching optimizer rule, with M = L (the depth
ratio to one block):

    optimizer     learning rate   weight decay   Adam ε
    sgd           × M             × 1/M          –
    adam, adamw   × 1             × 1            × 1/M

The stem and the classifier keep the base settings. The model carries the multiplier on its blocks
(`ResidualBlock.depth_multiplier`), and `hidden_depth_ratios` reads it back for the optimizer
(deepres.training.optim.param_groups), so the rule follows the blocks through wrappers that keep modules.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from deepres.errors import ConfigError

DepthScalingName = Literal["none", "completep"]
DEPTH_SCALINGS: tuple[str, ...] = ("none", "completep")


def check_depth_scaling(name: str, gate: str, *, reversible: bool = False) -> None:
    if name not in DEPTH_SCALINGS:
        raise ConfigError(f"unknown depth_scaling {name!r}. Valid: {', '.join(DEPTH_SCALINGS)}.")
    if name == "none":
        return
    if gate == "plain":
        raise ConfigError(f"depth_scaling={name!r} scales the change each block makes to its carried input, and "
                          "plain blocks (y = h(x)) carry nothing. Fix: gate='residual', 'highway' or 'gated', "
                          "or depth_scaling='none'.")
    if reversible:
        raise ConfigError(f"depth_scaling={name!r} is not implemented for reversible blocks. "
                          "Fix: reversible=false, or depth_scaling='none'.")


def branch_multiplier(num_blocks: int) -> float:
    """1/L: the fixed multiplier on each of L blocks' change (CompleteP's L^−α with α = 1, base depth 1)."""
    return 1.0 / max(num_blocks, 1)


def init_blocks(name: str, num_blocks: int) -> int:
    """The block count at which depth-dependent initial values are resolved (the `auto` gate biases, the
    presets' scales such as LayerScale's ε(L) or Fixup's L^(−1/(2m−2))): one block under CompleteP, whose 1/L
    multiplier takes their place, so that a block starts the same at every depth; all L blocks otherwise."""
    return 1 if name == "completep" else num_blocks


def apply_depth_scaling(blocks: Iterable[nn.Module], name: str, num_blocks: int) -> None:
    """Set the multiplier on every block with a carry path (a no-op for `none`)."""
    if name == "none":
        return
    from deepres.models.blocks import ResidualBlock
    from deepres.models.hyper import HyperBlock

    multiplier = branch_multiplier(num_blocks)
    for block in blocks:
        if (isinstance(block, ResidualBlock) and block.gate != "plain") or isinstance(block, HyperBlock):
            block.depth_multiplier = multiplier


@dataclass(frozen=True)
class HiddenRule:
    """Factors on the base learning rate, weight decay and Adam ε for the parameters of a scaled block."""

    lr: float = 1.0
    weight_decay: float = 1.0
    eps: float = 1.0


def hidden_rule(optimizer: str, depth_ratio: float) -> HiddenRule:
    """The rule for depth ratio M = 1/multiplier. SGD: a hidden weight's gradient carries the 1/M, so its step
    needs × M to change the block's output by as much as at one block; the decay × 1/M keeps lr·decay, the
    shrink per step, unchanged. Adam normalises the gradient away (lr × 1), but its ε must shrink with it."""
    if optimizer == "sgd":
        return HiddenRule(lr=depth_ratio, weight_decay=1.0 / depth_ratio)
    if optimizer in ("adam", "adamw"):
        return HiddenRule(eps=1.0 / depth_ratio)
    raise ConfigError(f"no depth-scaling rule for optimizer {optimizer!r}; known: sgd, adam, adamw.")


def hidden_depth_ratios(model: nn.Module) -> dict[int, float]:
    """id(parameter) → depth ratio M for every parameter inside a block with a multiplier (empty without one)."""
    ratios: dict[int, float] = {}
    for module in model.modules():
        multiplier = getattr(module, "depth_multiplier", 1.0)
        if multiplier != 1.0:
            for p in module.parameters():
                ratios[id(p)] = 1.0 / multiplier
    return ratios


__all__ = [
    "DEPTH_SCALINGS", "DepthScalingName", "HiddenRule", "apply_depth_scaling", "branch_multiplier",
    "check_depth_scaling", "init_blocks", "hidden_depth_ratios", "hidden_rule",
]
