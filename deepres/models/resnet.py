"""ResNets of any depth, with any gate: ImageNet ResNets (He et al. 2015; torchvision layout),
CIFAR ResNets of depth 6n+2 (He et al. 2015, Sec. 4.2) and pre-activation bottleneck ResNets of
depth 9n+2 (He et al. 2016). `gate="highway"` or `"gated"` turns any of them into a Highway or
gated ResNet with the same bodies.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from deepres.errors import ConfigError
from deepres.models.blocks import (
    BlockStack,
    GateBias,
    GateKind,
    ResidualBlock,
    check_gate,
    conv_gate,
    resolve_gate_biases,
)
from deepres.models.bodies import (
    BasicBody,
    BottleneckBody,
    PreActBasicBody,
    PreActBottleneckBody,
    check_norm,
    conv,
    conv1x1,
    conv3x3,
    make_norm,
)
from deepres.models.init_presets import (
    InitName,
    block_scales,
    check_drop_path,
    check_init,
    init_branch_,
    plain_init_,
    resolve_norm,
    zero_classifier_,
)
from deepres.models.registry import register_model, register_variants
from deepres.models.reversible import ReversibleStack, check_reversible, reversible_block

BodyKind = Literal["basic", "bottleneck", "preact_basic", "preact_bottleneck"]
EXPANSION = {"basic": 1, "bottleneck": 4, "preact_basic": 1, "preact_bottleneck": 4}


class PadShortcut(nn.Module):
    """Option-A shortcut of the CIFAR ResNets: subsample and zero-pad channels, no parameters."""

    def __init__(self, out_ch: int, stride: int):
        super().__init__()
        self.out_ch, self.stride = out_ch, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        pad = self.out_ch - x.shape[1]
        return nn.functional.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))


class ResNet(nn.Module):
    """stem → blocks → head. `blocks` is flat across stages; a stage starts where stride/width change."""

    def __init__(self, stem: nn.Module, blocks: BlockStack, head: nn.Module):
        super().__init__()
        self.stem = stem
        self.blocks = blocks
        self.head = head

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        return self.head(y)  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exit(self.blocks(self.entry(x)))


def build_blocks(
    body: BodyKind,
    in_ch: int,
    widths: list[int],
    blocks_per_stage: list[int],
    strides: list[int],
    *,
    gate: GateKind,
    gate_bias: GateBias,
    carry_bias: GateBias,
    shortcut: Literal["projection", "pad"] = "projection",
    zero_init_last: bool = True,
    gate_group_width: int | None = 16,
    init: str = "default",
    norm: str = "batch",
    drop_path: float = 0.0,
    reversible: bool = False,
) -> tuple[BlockStack, int]:
    """The builder loop: one place that knows every block's index, stride and shape.
    `norm` is already resolved (resolve_norm); Fixup's bodies get scalar biases in the norms' place.

    `reversible`: blocks that keep the shape become reversible couplings of two half-width bodies
    (deepres.models.reversible; post-activation bodies lose the ReLU after the merge, which has no
    inverse); blocks that change stride or channels stay ordinary blocks."""
    check_gate(gate)
    num_blocks = sum(blocks_per_stage)
    tb, cb = resolve_gate_biases(gate, num_blocks, gate_bias, carry_bias)
    zero_init = zero_init_last and gate in ("residual", "gated") and init == "default"
    preact = body.startswith("preact")
    body_norm = "scalar_bias" if init == "fixup" else norm
    blocks = []
    for width, n, stage_stride in zip(widths, blocks_per_stage, strides, strict=True):
        out_ch = width * EXPANSION[body]
        for i in range(n):
            stride = stage_stride if i == 0 else 1
            if reversible and stride == 1 and in_ch == out_ch:
                check_reversible(gate, out_ch, init, drop_path)
                blocks.append(_reversible_block(body, out_ch, width // 2, gate, tb, cb, zero_init, gate_group_width,
                                                body_norm))
                continue
            if body == "basic":
                h = BasicBody(in_ch, out_ch, stride, zero_init, body_norm)
            elif body == "bottleneck":
                h = BottleneckBody(in_ch, width, out_ch, stride, zero_init, body_norm)
            elif body == "preact_basic":
                h = PreActBasicBody(in_ch, out_ch, stride, zero_init, body_norm)
            else:
                h = PreActBottleneckBody(in_ch, width, out_ch, stride, zero_init, body_norm)
            init_branch_(h, init, num_blocks)
            sc = None
            if gate != "plain" and (stride != 1 or in_ch != out_ch):
                if shortcut == "pad":
                    sc = PadShortcut(out_ch, stride)
                elif preact:  # He et al. 2016: a bare 1x1 conv on the pre-activated input
                    sc = conv1x1(in_ch, out_ch, stride)
                else:
                    sc = nn.Sequential(conv1x1(in_ch, out_ch, stride), make_norm(norm, out_ch))
            t = conv_gate(in_ch, out_ch, tb, stride, group_width=gate_group_width) if gate in ("highway", "gated") else None
            g = conv_gate(in_ch, out_ch, cb, stride, group_width=gate_group_width) if gate == "gated" else None
            post = None if preact else nn.ReLU(inplace=True)
            if init == "deepnorm":  # DeepNorm normalises after the merge: y = norm(α·s + h)
                post = make_norm(norm, out_ch) if preact else nn.Sequential(make_norm(norm, out_ch), post)
            blocks.append(
                ResidualBlock(
                    h, gate, shortcut=sc, transform_gate=t, carry_gate=g, post=post,
                    shortcut_from_body_input=preact and sc is not None and shortcut != "pad",
                    **block_scales(init, num_blocks, out_ch, spatial_dims=2),
                )
            )
            in_ch = out_ch
    stack = (ReversibleStack if reversible else BlockStack)(blocks)
    if drop_path:
        stack.set_drop_path(drop_path)
    return stack, in_ch


def _check_presets(init: str, norm: str | None, drop_path: float, gate: str) -> str:
    """Validate init/norm/drop_path before anything is built; returns the resolved norm."""
    check_gate(gate)
    check_init(init, gate, conv=True)
    check_drop_path(drop_path, gate)
    norm = resolve_norm(norm, init)
    check_norm(norm)
    return norm


def _finish(model: ResNet, init: str) -> ResNet:
    if init == "fixup":
        zero_classifier_(model.head)
    elif init == "delta_orthogonal":
        plain_init_(model, "relu")
    return model


def _reversible_block(body: BodyKind, channels: int, width: int, gate: GateKind, tb: float, cb: float,
                      zero_init: bool, gate_group_width: int | None, norm: str = "batch"):
    half = channels // 2

    def make_body() -> nn.Module:
        if body == "basic":
            return BasicBody(half, half, 1, zero_init, norm)
        if body == "bottleneck":
            return BottleneckBody(half, width, half, 1, zero_init, norm)
        if body == "preact_basic":
            return PreActBasicBody(half, half, 1, zero_init, norm)
        return PreActBottleneckBody(half, width, half, 1, zero_init, norm)

    return reversible_block(gate, make_body, lambda b: conv_gate(half, half, b, group_width=gate_group_width), tb, cb)


# ----------------------------------------------------------------------------------------------
# ImageNet ResNets
# ----------------------------------------------------------------------------------------------
@register_model
def imagenet_resnet(
    layers: list[int] = (3, 4, 6, 3),
    body: BodyKind = "bottleneck",
    gate: GateKind = "residual",
    gate_bias: GateBias = "auto",
    carry_bias: GateBias = "auto",
    num_classes: int = 1000,
    in_chans: int = 3,
    zero_init_last: bool = True,
    gate_group_width: int | None = 16,
    init: InitName = "default",
    norm: str | None = None,
    drop_path: float = 0.0,
    reversible: bool = False,
) -> ResNet:
    """ImageNet ResNet in torchvision's layout (same parameter count for gate="residual").

    Args:
        layers: blocks per stage; any depth, e.g. [3, 24, 36, 3] is ResNet-200.
        body: "basic" (ResNet-18/34), "bottleneck" (50+), or their pre-activation forms.
        gate: plain | residual | highway | gated.
        gate_bias: transform gate bias, "auto" = −ln(L) − 1 for L blocks.
        carry_bias: carry gate bias of "gated" blocks, "auto" = ln(L) + 1.
        gate_group_width: channels per group of the 1x1 gate convs (None: a full 1x1 conv).
        init: default | rezero | skipinit | layerscale | fixup | deepnorm (gate="residual") |
            delta_orthogonal (gate="plain"); docs/science.md#depth-aware-initialisation-presets.
        norm: batch | group | layer | none; unset: none for the norm-free presets, else batch.
        drop_path: stochastic depth, the drop rate of the last block (linear in the block index).
        reversible: shape-keeping blocks as reversible couplings (deepres.models.reversible).
    """
    norm = _check_presets(init, norm, drop_path, gate)
    stem_norm = "scalar_bias" if init == "fixup" else norm
    layers = list(layers)
    if len(layers) != 4 or min(layers) < 1:
        raise ConfigError(f"ImageNet ResNets have 4 stages of >= 1 block; got layers={layers}.")
    stem = nn.Sequential(
        conv(in_chans, 64, 7, stride=2),
        make_norm(stem_norm, 64), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1),
    )
    blocks, out_ch = build_blocks(
        body, 64, [64, 128, 256, 512], layers, [1, 2, 2, 2], gate=gate, gate_bias=gate_bias,
        carry_bias=carry_bias, zero_init_last=zero_init_last, gate_group_width=gate_group_width,
        init=init, norm=norm, drop_path=drop_path,
        reversible=reversible,
    )
    pre_head = [make_norm(stem_norm, out_ch), nn.ReLU(inplace=True)] if body.startswith("preact") else []
    head = nn.Sequential(*pre_head, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out_ch, num_classes))
    return _finish(ResNet(stem, blocks, head), init)


register_variants(imagenet_resnet, {
    "resnet18": ("ImageNet ResNet-18 (He et al. 2015, Table 1).", {"layers": [2, 2, 2, 2], "body": "basic"}),
    "resnet34": ("ImageNet ResNet-34 (He et al. 2015, Table 1).", {"layers": [3, 4, 6, 3], "body": "basic"}),
    "resnet50": ("ImageNet ResNet-50 (He et al. 2015, Table 1).", {"layers": [3, 4, 6, 3], "body": "bottleneck"}),
    "resnet101": ("ImageNet ResNet-101 (He et al. 2015, Table 1).", {"layers": [3, 4, 23, 3], "body": "bottleneck"}),
    "resnet152": ("ImageNet ResNet-152 (He et al. 2015, Table 1).", {"layers": [3, 8, 36, 3], "body": "bottleneck"}),
    "resnet200": ('ImageNet ResNet-200 (He et al. 2016, "Identity Mappings in Deep Residual Networks").',
                  {"layers": [3, 24, 36, 3], "body": "bottleneck"}),
})


# ----------------------------------------------------------------------------------------------
# CIFAR ResNets
# ----------------------------------------------------------------------------------------------
def _blocks_per_stage(depth: int, per_block: int, name: str) -> int:
    """Depth = per_block·n·3 + 2; refuse others, naming the valid neighbours."""
    step = 3 * per_block
    if depth < step + 2 or (depth - 2) % step:
        below = (depth - 2) // step * step + 2
        lo, hi = (below, below + step) if below >= step + 2 else (step + 2, step + 2)
        raise ConfigError(
            f"{name} depth must be {step}n+2 (n >= 1 blocks per stage); got depth={depth}. "
            f"Valid neighbours: {', '.join(str(d) for d in sorted({lo, hi}))}."
        )
    return (depth - 2) // step


@register_model
def cifar_resnet(
    depth: int = 20,
    gate: GateKind = "residual",
    gate_bias: GateBias = "auto",
    carry_bias: GateBias = "auto",
    num_classes: int = 10,
    in_chans: int = 3,
    zero_init_last: bool = True,
    gate_group_width: int | None = None,
    init: InitName = "default",
    norm: str | None = None,
    drop_path: float = 0.0,
    reversible: bool = False,
) -> ResNet:
    """CIFAR ResNet of depth 6n+2: 3 stages of n basic blocks (16, 32, 64 channels), option-A
    (parameter-free) shortcuts, as in He et al. 2015, Sec. 4.2. `init`, `norm`, `drop_path`: as
    imagenet_resnet."""
    norm = _check_presets(init, norm, drop_path, gate)
    n = _blocks_per_stage(depth, 2, "CIFAR ResNet")
    stem = nn.Sequential(conv3x3(in_chans, 16), make_norm("scalar_bias" if init == "fixup" else norm, 16),
                         nn.ReLU(inplace=True))
    blocks, out_ch = build_blocks(
        "basic", 16, [16, 32, 64], [n] * 3, [1, 2, 2], gate=gate, gate_bias=gate_bias, carry_bias=carry_bias,
        shortcut="pad", zero_init_last=zero_init_last, gate_group_width=gate_group_width,
        init=init, norm=norm, drop_path=drop_path,
        reversible=reversible,
    )
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out_ch, num_classes))
    return _finish(ResNet(stem, blocks, head), init)


@register_model
def preact_resnet_cifar(
    depth: int = 164,
    gate: GateKind = "residual",
    gate_bias: GateBias = "auto",
    carry_bias: GateBias = "auto",
    num_classes: int = 10,
    in_chans: int = 3,
    zero_init_last: bool = True,
    gate_group_width: int | None = None,
    init: InitName = "default",
    norm: str | None = None,
    drop_path: float = 0.0,
    reversible: bool = False,
) -> ResNet:
    """Pre-activation bottleneck ResNet of depth 9n+2 (He et al. 2016): 3 stages of n units with
    16/32/64 bottleneck widths (64/128/256 outputs); BN-ReLU before the pooled head. `init`, `norm`,
    `drop_path`: as imagenet_resnet."""
    norm = _check_presets(init, norm, drop_path, gate)
    n = _blocks_per_stage(depth, 3, "pre-activation CIFAR ResNet")
    stem = conv3x3(in_chans, 16)
    blocks, out_ch = build_blocks(
        "preact_bottleneck", 16, [16, 32, 64], [n] * 3, [1, 2, 2], gate=gate, gate_bias=gate_bias,
        carry_bias=carry_bias, zero_init_last=zero_init_last, gate_group_width=gate_group_width,
        init=init, norm=norm, drop_path=drop_path,
        reversible=reversible,
    )
    head = nn.Sequential(
        make_norm("scalar_bias" if init == "fixup" else norm, out_ch), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(out_ch, num_classes),
    )
    return _finish(ResNet(stem, blocks, head), init)


register_variants(cifar_resnet, {
    f"resnet{depth}_cifar": (f"CIFAR ResNet-{depth} (He et al. 2015, Sec. 4.2).", {"depth": depth})
    for depth in (20, 32, 44, 56, 110, 1202)
})
register_variants(preact_resnet_cifar, {
    f"preact_resnet{depth}_cifar": (f"CIFAR PreAct-ResNet-{depth} (He et al. 2016).", {"depth": depth})
    for depth in (164, 1001)
})
