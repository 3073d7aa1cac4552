"""Depth-aware initialisation presets: one `init=` argument on every residual-family model.

Every block computes  y = g(x)·x + t(x)·h(x)  (deepres/models/blocks.py). Each preset below makes
the block start as (nearly) the identity, scaled by the depth L, by choosing where a scale sits in
that equation (docs/science.md#depth-aware-initialisation-presets):

    preset            block at init                                      paper
    default           residual: h ends in a zero-initialised norm/layer   Goyal et al. 2017
                      highway: t = σ(−ln L − 1)                           Srivastava et al. 2015
    rezero            y = x + α·h(x),  α = 0 learnable (transform scale)  Bachlechner et al. 2020
    skipinit          y = x + α·h(x),  α = 0 learnable, needs α < 1/√L    De & Smith 2020
    layerscale        y = x + diag(λ)·h(x), λ_c = ε(L)                    Touvron et al. 2021
    fixup             y = x + a·h(x), h's last layer 0, others ×L^(−1/(2m−2)), classifier 0, no norm
                                                                          Zhang, Dauphin & Ma 2019
    deepnorm          y = LN(α·x + h(x)), α = (2L)^¼ (carry scale), h's weights ×(8L)^−¼
                                                                          Wang et al. 2022
    orthogonal        plain dense: W = σ_w·Q, Q orthogonal, (σ_w, σ_b) at criticality
    delta_orthogonal  plain conv: W[:, :, k/2, k/2] = σ_w·Q, zero elsewhere  Xiao et al. 2018

The residual presets need `gate="residual"` (with α = 0 a highway block still scales its carry by
1 − t, so it is not the identity); the orthogonal ones need `gate="plain"`.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import nn

from deepres.errors import ConfigError

InitName = Literal["default", "fixup", "rezero", "skipinit", "layerscale", "deepnorm", "orthogonal", "delta_orthogonal"]
RESIDUAL_INITS = ("fixup", "rezero", "skipinit", "layerscale", "deepnorm")
PLAIN_INITS = ("orthogonal", "delta_orthogonal")
INITS: tuple[str, ...] = ("default", *RESIDUAL_INITS, *PLAIN_INITS)
# presets whose papers train without normalisation layers: their models default to norm="none"
NORM_FREE_INITS = ("fixup", "rezero", "skipinit", "orthogonal", "delta_orthogonal")


def check_init(init: str, gate: str, *, conv: bool) -> None:
    """Refuse a preset the model or gate cannot honour, naming the fix."""
    if init not in INITS:
        raise ConfigError(f"unknown init {init!r}. Valid presets: {', '.join(INITS)}.")
    if init in RESIDUAL_INITS and gate != "residual":
        raise ConfigError(
            f"init={init!r} scales the branch of y = x + h(x) and needs gate='residual'; got gate={gate!r}. "
            f"Fix: set gate='residual', or use init='default' (the depth-aware gate biases) with gate={gate!r}."
        )
    if init in PLAIN_INITS:
        if gate != "plain":
            raise ConfigError(f"init={init!r} is for plain nets (gate='plain'); got gate={gate!r}. "
                              "Fix: set gate='plain', or pick a residual preset (rezero, fixup, ...).")
        right = "delta_orthogonal" if conv else "orthogonal"
        if init != right:
            raise ConfigError(f"init={init!r} does not fit a {'convolutional' if conv else 'dense'} net; "
                              f"use init={right!r}.")


def check_drop_path(rate: float, gate: str) -> None:
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"drop_path must be in [0, 1) (the drop rate at the last block); got {rate}.")
    if rate > 0 and gate == "plain":
        raise ConfigError("drop_path needs a carry path to fall back on, and plain blocks have none "
                          "(y = h(x)). Fix: drop_path=0, or gate='residual' / 'highway' / 'gated'.")


# ----------------------------------------------------------------------------------------------
# The scales each preset puts into y = g(x)·x + t(x)·h(x)
# ----------------------------------------------------------------------------------------------
def layerscale_epsilon(num_blocks: int) -> float:
    """LayerScale's initial diagonal (Touvron et al. 2021, CaiT, Sec. 3): 0.1 up to depth 18,
    1e-5 up to depth 24, 1e-6 deeper."""
    if num_blocks <= 18:
        return 0.1
    if num_blocks <= 24:
        return 1e-5
    return 1e-6


def deepnorm_alpha(num_blocks: int) -> float:
    """DeepNorm's carry scale α = (2N)^¼ for an N-block encoder (Wang et al. 2022, Table 1)."""
    return (2.0 * num_blocks) ** 0.25


def deepnorm_beta(num_blocks: int) -> float:
    """DeepNorm's branch-weight init scale β = (8N)^−¼ (Wang et al. 2022, Table 1)."""
    return (8.0 * num_blocks) ** -0.25


def fixup_scale(num_blocks: int, branch_layers: int) -> float:
    """Fixup's rescaling of the branch layers before the last: L^(−1/(2m−2)) for L branches of m
    layers (Zhang, Dauphin & Ma 2019, Sec. 3, rule 2)."""
    if branch_layers < 2:
        raise ValueError("Fixup needs branches of >= 2 layers (the last one starts at zero)")
    return num_blocks ** (-1.0 / (2 * branch_layers - 2))


def skipinit_bound(num_blocks: int) -> float:
    """SkipInit's condition on the initial branch scale, α < 1/√L (De & Smith 2020, Sec. 4)."""
    return 1.0 / math.sqrt(num_blocks)


class BranchScale(nn.Module):
    """h(x) ↦ α ⊙ h(x): the transform-path scale of ReZero/SkipInit/Fixup (one scalar) or LayerScale
    (one value per channel, broadcast over the trailing spatial dimensions)."""

    def __init__(self, init: float, channels: int | None = None, spatial_dims: int = 0):
        super().__init__()
        shape = (1,) if channels is None else (channels, *([1] * spatial_dims))
        self.weight = nn.Parameter(torch.full(shape, float(init)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.weight

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"


class ScalarBias(nn.Module):
    """x ↦ x + b, one learnable scalar initialised to 0 (Fixup's "scalar biases", in place of a norm)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


class FixupOutput(nn.Module):
    """x ↦ a·x + b: Fixup's scalar multiplier (init 1) and bias (init 0) at the end of a branch."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x, self.scale)


# ----------------------------------------------------------------------------------------------
# Criticality for plain nets (mean-field theory: Poole et al. 2016; Schoenholz et al. 2017)
# ----------------------------------------------------------------------------------------------
_PHI = {"tanh": (np.tanh, lambda u: 1.0 / np.cosh(u) ** 2), "relu": (lambda u: np.maximum(u, 0), lambda u: (u > 0) * 1.0)}
DEFAULT_BIAS_VARIANCE = 1e-5  # small σ_b², as in Xiao et al. 2018's 10,000-layer runs


def critical_point(activation: str, bias_variance: float = DEFAULT_BIAS_VARIANCE) -> tuple[float, float]:
    """(σ_w², σ_b²) on the order-to-chaos line χ₁ = σ_w²·E[φ'(√q* z)²] = 1, where q* is the fixed point
    of the variance map q = σ_w²·E[φ(√q z)²] + σ_b², z ~ N(0, 1) (Gauss–Hermite quadrature).

    At χ₁ = 1 the mean squared singular value of each layer's Jacobian is 1: the error neither
    vanishes nor explodes with depth (docs/science.md#plain-nets-at-criticality). ReLU: σ_w² = 2 for any σ_b²."""
    if activation == "relu" or activation in ("gelu", "silu"):
        return 2.0, 0.0
    if activation not in _PHI:
        raise ConfigError(f"no critical initialisation known for activation {activation!r}; use tanh or relu.")
    phi, dphi = _PHI[activation]
    z, w = np.polynomial.hermite_e.hermegauss(101)
    w = w / w.sum()

    def q_star(sw2: float) -> float:
        q = 1.0
        for _ in range(2000):
            q_new = sw2 * float(w @ phi(math.sqrt(q) * z) ** 2) + bias_variance
            if abs(q_new - q) < 1e-14:
                break
            q = q_new
        return q

    def chi(sw2: float) -> float:
        return sw2 * float(w @ dphi(math.sqrt(q_star(sw2)) * z) ** 2)

    lo, hi = 0.5, 4.0  # χ₁ grows with σ_w² along the line; bisect for χ₁ = 1
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if chi(mid) < 1.0 else (lo, mid)
    return 0.5 * (lo + hi), bias_variance


@torch.no_grad()
def orthogonal_(layer: nn.Linear, weight_variance: float, bias_variance: float) -> None:
    """W = σ_w·Q with Q a random orthogonal matrix (Saxe et al. 2014), b ~ N(0, σ_b²)."""
    nn.init.orthogonal_(layer.weight, gain=math.sqrt(weight_variance))
    if layer.bias is not None:
        nn.init.normal_(layer.bias, std=math.sqrt(bias_variance))


@torch.no_grad()
def delta_orthogonal_(conv: nn.Conv2d, weight_variance: float, bias_variance: float) -> None:
    """Xiao et al. 2018, Algorithm 2: zero kernel except its centre tap, which is σ_w·Q with Q an
    (out × in) orthogonal matrix: at init the conv is a norm-preserving map of each pixel's channels."""
    out_ch, in_ch, kh, kw = conv.weight.shape
    conv.weight.zero_()
    centre = torch.empty(out_ch, in_ch)
    nn.init.orthogonal_(centre, gain=math.sqrt(weight_variance))
    conv.weight[:, :, kh // 2, kw // 2] = centre
    if conv.bias is not None:
        nn.init.normal_(conv.bias, std=math.sqrt(bias_variance))


def plain_init_(model: nn.Module, activation: str, bias_variance: float = DEFAULT_BIAS_VARIANCE) -> tuple[float, float]:
    """Apply orthogonal / delta-orthogonal init at criticality to every Linear and Conv2d of `model`
    except the classifier's last layer (left at its default). Returns (σ_w², σ_b²)."""
    sw2, sb2 = critical_point(activation, bias_variance)
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for layer in layers[:-1]:
        if isinstance(layer, nn.Conv2d):
            delta_orthogonal_(layer, sw2, sb2)
        else:
            orthogonal_(layer, sw2, sb2)
    return sw2, sb2


def scaled_(module: nn.Module, factor: float) -> None:
    """Multiply every weight of the Linear/Conv layers in `module` by `factor` (DeepNorm's β, Fixup's rescale)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(factor)


def block_scales(init: str, num_blocks: int, channels: int, spatial_dims: int = 0) -> dict:
    """The ResidualBlock arguments a preset sets: `branch_scale` on h (transform path) or `carry_scale` on x."""
    if init in ("rezero", "skipinit"):
        return {"branch_scale": BranchScale(0.0)}  # SkipInit's α = 0 satisfies α < 1/√L at every depth
    if init == "layerscale":
        return {"branch_scale": BranchScale(layerscale_epsilon(num_blocks), channels, spatial_dims)}
    if init == "fixup":
        return {"branch_scale": FixupOutput()}
    if init == "deepnorm":
        return {"carry_scale": deepnorm_alpha(num_blocks)}
    return {}


def init_branch_(body: nn.Module, init: str, num_blocks: int) -> None:
    """Re-initialise a branch's weights for its preset: DeepNorm ×β on every layer; Fixup zero on the
    last layer and ×L^(−1/(2m−2)) on the m − 1 before it."""
    if init == "deepnorm":
        beta = deepnorm_beta(num_blocks)
        scaled_(body, beta)
        # a norm inside the branch would undo the scale of the layers before it: scale its γ too
        norms = [m for m in body.modules() if isinstance(m, _AFFINE_NORMS) and getattr(m, "weight", None) is not None]
        if norms:
            with torch.no_grad():
                norms[-1].weight.mul_(beta)
    elif init == "fixup":
        layers = [m for m in body.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        with torch.no_grad():
            layers[-1].weight.zero_()
        if len(layers) > 1 and not getattr(body, "fixup_scaled", False):
            scaled_(nn.ModuleList(layers[:-1]), fixup_scale(num_blocks, len(layers)))


_AFFINE_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def zero_classifier_(head: nn.Module) -> None:
    """Fixup's rule 1: the last layer of the classifier starts at zero."""
    last = [m for m in head.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    with torch.no_grad():
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()


def resolve_norm(norm: str | None, init: str) -> str:
    """None → "none" for the norm-free presets, else "batch"; Fixup refuses a norm."""
    if norm is None:
        return "none" if init in NORM_FREE_INITS else "batch"
    if init == "fixup" and norm != "none":
        raise ConfigError(f"init='fixup' trains without normalisation (its point); got norm={norm!r}. "
                          "Fix: norm='none' (or leave norm unset), or use init='default' with that norm.")
    if init == "deepnorm" and norm == "none":
        raise ConfigError("init='deepnorm' puts a norm after every merge, y = norm(α·x + h(x)); norm='none' "
                          "leaves α^L growth unchecked. Fix: norm='layer', 'group' or 'batch'.")
    return norm


__all__ = [
    "block_scales", "init_branch_", "resolve_norm", "zero_classifier_",
    "INITS", "NORM_FREE_INITS", "PLAIN_INITS", "RESIDUAL_INITS", "BranchScale", "FixupOutput", "ScalarBias",
    "check_drop_path", "check_init", "critical_point", "deepnorm_alpha", "deepnorm_beta", "delta_orthogonal_",
    "fixup_scale", "layerscale_epsilon", "orthogonal_", "plain_init_", "scaled_", "skipinit_bound",
]
