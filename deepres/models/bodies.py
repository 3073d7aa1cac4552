"""Block bodies h(x): the transformation a residual-family block gates.

Post-activation bodies (He et al. 2015) end in a norm; pre-activation bodies (He et al. 2016)
start with norm → activation and end in a conv or linear layer. `zero_init` zeroes that last
norm/layer so that a residual or gated block starts as the identity (Goyal et al. 2017;
docs/science.md#one-family-of-blocks).
Pre-activation bodies expose `preact` and `branch` (body = branch ∘ preact) because a shape-changing
shortcut takes the pre-activated input.
"""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

from deepres.errors import ConfigError
from deepres.models.blocks import make_activation
from deepres.models.init_presets import ScalarBias

NormKind = Literal["batch", "group", "layer", "none"]
NORMS: tuple[str, ...] = ("batch", "group", "layer", "none")


def check_norm(norm: str) -> None:
    # "scalar_bias" is internal: Fixup's learnable scalar bias in each norm's place
    if norm not in (*NORMS, "scalar_bias"):
        raise ConfigError(f"unknown norm {norm!r}. Valid norms: {', '.join(NORMS)}.")


def make_norm(kind: str, channels: int) -> nn.Module:
    """The normalisation of conv bodies: BatchNorm (per-device batch statistics), GroupNorm with
    groups of 16 channels (independent of the batch: suits small per-device batches; Wu & He 2018),
    LayerNorm over (C, H, W) as a one-group GroupNorm, or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, max(1, channels // 16)), channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "scalar_bias":
        return ScalarBias()
    check_norm(kind)
    return nn.Identity()


def zero_last_(norm: nn.Module, conv: nn.Conv2d) -> None:
    """Make a branch start at 0: zero its last norm's scale, or, without a norm, its last conv."""
    if getattr(norm, "weight", None) is not None and not isinstance(norm, ScalarBias):
        nn.init.zeros_(norm.weight)
    else:
        nn.init.zeros_(conv.weight)


def conv(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    """A bias-free conv (a norm follows) with He fan-out init, as torchvision's ResNets."""
    c = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")
    return c


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return conv(in_ch, out_ch, 3, stride)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return conv(in_ch, out_ch, 1, stride)


# torch.nn.init gain names; GELU and SiLU pass about as much signal as ReLU
INIT_NONLINEARITY = {"relu": "relu", "gelu": "relu", "silu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}


class DenseBody(nn.Sequential):
    """act(W x + b): the fully connected layer of Srivastava et al. 2015.

    W is He-initialised for the activation (normal, std = gain/sqrt(fan_in), gain sqrt(2) for ReLU,
    5/3 for tanh) and b = 0, as the paper's plain nets were. PyTorch's default Linear init (variance
    1/(3 fan_in)) shrinks the backpropagated error by about 0.41 per ReLU layer: a plain net of ten
    such layers already sits at chance on the digits.
    """

    def __init__(self, in_features: int, out_features: int, activation: str = "relu"):
        super().__init__(nn.Linear(in_features, out_features), make_activation(activation))
        nn.init.kaiming_normal_(self[0].weight, nonlinearity=INIT_NONLINEARITY[activation])
        nn.init.zeros_(self[0].bias)


class PreActDenseBody(nn.Module):
    """W·act(norm(x)) + b with W zero-initialised: a dense residual branch that starts at 0 and
    still gets a gradient (a zero-initialised layer *followed* by ReLU would not: relu'(0) = 0)."""

    # its last op (norm, conv or linear) does not keep its output for backward, so a residual block
    # may add the shortcut into that output in place (as torchvision's ResNets do: one tensor fewer)
    output_not_saved = True

    def __init__(self, in_features: int, out_features: int, activation: str = "relu", zero_init: bool = True):
        super().__init__()
        self.preact = nn.Sequential(nn.LayerNorm(in_features), make_activation(activation))
        self.branch = nn.Linear(in_features, out_features)
        if zero_init:
            nn.init.zeros_(self.branch.weight)
            nn.init.zeros_(self.branch.bias)

    def forward(self, x):
        return self.branch(self.preact(x))


class FixupDenseBody(nn.Module):
    """Fixup's two-layer dense branch without norm (Zhang, Dauphin & Ma 2019, Sec. 3):
    W₂·act(W₁(x + a₁) + a₂) + a₃ with scalar biases a (init 0); W₁ is He-initialised and rescaled by
    L^(−1/2) (m = 2 layers per branch), W₂ starts at zero. The scalar multiplier at the end of the
    branch is the block's `branch_scale` (deepres.models.init_presets.FixupOutput)."""

    output_not_saved = True
    fixup_scaled = True  # fc1 already carries the L^(−1/2) rescale

    def __init__(self, features: int, num_blocks: int, activation: str = "relu"):
        from deepres.models.init_presets import fixup_scale

        super().__init__()
        self.bias_in = ScalarBias()
        self.fc1 = nn.Linear(features, features, bias=False)
        self.bias_act = ScalarBias()
        self.act = make_activation(activation)
        self.bias_mid = ScalarBias()
        self.fc2 = nn.Linear(features, features, bias=False)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity=INIT_NONLINEARITY[activation])
        self.fc1.weight.data.mul_(fixup_scale(num_blocks, 2))
        nn.init.zeros_(self.fc2.weight)

    def forward(self, x):
        return self.fc2(self.bias_mid(self.act(self.bias_act(self.fc1(self.bias_in(x))))))


class ConvBody(nn.Sequential):
    """act(BN(conv_k(x))): one conv layer, as in the conv Highway nets of Srivastava et al. 2015."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, kernel_size: int = 3, activation: str = "relu",
                 norm: str = "batch"):
        c = conv(in_ch, out_ch, kernel_size, stride)
        if norm in ("none", "scalar_bias"):  # no norm follows: the conv keeps a bias of its own
            c = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=True)
            nn.init.kaiming_normal_(c.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(c.bias)
        super().__init__(c, make_norm(norm, out_ch), make_activation(activation))


class BasicBody(nn.Sequential):
    """conv3x3-BN-ReLU-conv3x3-BN (ResNet-18/34 and the CIFAR ResNets)."""

    # its last op (norm, conv or linear) does not keep its output for backward, so a residual block
    # may add the shortcut into that output in place (as torchvision's ResNets do: one tensor fewer)
    output_not_saved = True

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, zero_init: bool = True, norm: str = "batch"):
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = make_norm(norm, out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = make_norm(norm, out_ch)
        if zero_init:
            zero_last_(self.bn2, self.conv2)


class BottleneckBody(nn.Sequential):
    """1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1-BN, stride on the 3x3 ("ResNet v1.5", as torchvision)."""

    # its last op (norm, conv or linear) does not keep its output for backward, so a residual block
    # may add the shortcut into that output in place (as torchvision's ResNets do: one tensor fewer)
    output_not_saved = True

    def __init__(self, in_ch: int, width: int, out_ch: int, stride: int = 1, zero_init: bool = True,
                 norm: str = "batch"):
        super().__init__()
        self.conv1 = conv1x1(in_ch, width)
        self.bn1 = make_norm(norm, width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = make_norm(norm, width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = conv1x1(width, out_ch)
        self.bn3 = make_norm(norm, out_ch)
        if zero_init:
            zero_last_(self.bn3, self.conv3)


class PreActBasicBody(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 (He et al. 2016)."""

    # its last op (norm, conv or linear) does not keep its output for backward, so a residual block
    # may add the shortcut into that output in place (as torchvision's ResNets do: one tensor fewer)
    output_not_saved = True

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, zero_init: bool = True, norm: str = "batch"):
        super().__init__()
        self.preact = nn.Sequential(make_norm(norm, in_ch), nn.ReLU(inplace=False))
        self.branch = nn.Sequential(
            conv3x3(in_ch, out_ch, stride), make_norm(norm, out_ch), nn.ReLU(inplace=True), conv3x3(out_ch, out_ch)
        )
        if zero_init:
            nn.init.zeros_(self.branch[-1].weight)

    def forward(self, x):
        return self.branch(self.preact(x))


class PreActBottleneckBody(nn.Module):
    """BN-ReLU-1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1 (He et al. 2016, the unit of PreAct-ResNet-1001)."""

    # its last op (norm, conv or linear) does not keep its output for backward, so a residual block
    # may add the shortcut into that output in place (as torchvision's ResNets do: one tensor fewer)
    output_not_saved = True

    def __init__(self, in_ch: int, width: int, out_ch: int, stride: int = 1, zero_init: bool = True,
                 norm: str = "batch"):
        super().__init__()
        self.preact = nn.Sequential(make_norm(norm, in_ch), nn.ReLU(inplace=False))
        self.branch = nn.Sequential(
            conv1x1(in_ch, width),
            make_norm(norm, width), nn.ReLU(inplace=True), conv3x3(width, width, stride),
            make_norm(norm, width), nn.ReLU(inplace=True), conv1x1(width, out_ch),
        )
        if zero_init:
            nn.init.zeros_(self.branch[-1].weight)

    def forward(self, x):
        return self.branch(self.preact(x))
