"""Highway networks (Srivastava, Greff & Schmidhuber 2015, "Training Very Deep Networks").

`highway_mlp`: one plain layer, then depth − 1 gated layers, then a linear classifier — the fully
connected nets of the paper's Fig. 1 (plain: 71 units, highway: 50 units for about the same
parameters). `highway_cnn_cifar`: the conv Highway net of the paper's CIFAR table (19 layers,
≈ 2.3 M parameters; layer widths chosen here to match that size, with BN added).
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
    dense_gate,
    resolve_gate_biases,
)
from deepres.models.bodies import ConvBody, DenseBody, PreActDenseBody
from deepres.models.registry import register_model
from deepres.models.reversible import ReversibleStack, check_reversible, reversible_block


class HighwayMLP(nn.Module):
    def __init__(self, stem: nn.Module, blocks: BlockStack, head: nn.Module):
        super().__init__()
        self.stem, self.blocks, self.head = stem, blocks, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, in_features)
        return self.head(self.blocks(self.stem(x)))


@register_model
def highway_mlp(
    depth: int = 100,
    width: int = 50,
    gate: GateKind = "highway",
    gate_bias: GateBias = "auto",
    carry_bias: GateBias = "auto",
    activation: str = "relu",
    body: Literal["post", "pre"] | None = None,
    in_features: int = 784,
    num_classes: int = 10,
    reversible: bool = False,
) -> HighwayMLP:
    """Fully connected net of `depth` hidden layers: 1 plain layer + (depth − 1) blocks.

    Args:
        depth: hidden layers (the paper's 10/20/50/100; SGD still trains at 1000+).
        width: units per layer (paper: 50 highway, 71 plain).
        gate: plain | residual | highway | gated.
        gate_bias: transform gate bias; "auto" = −ln(L) − 1 for L = depth − 1 blocks
            (paper: −1 … −3; a fixed −3 stops error flow beyond ~100 layers, see
            docs/science.md#the-highway-transform-gate-bias).
        carry_bias: carry gate bias of "gated" blocks; "auto" = ln(L) + 1.
        activation: relu | tanh | gelu | silu | sigmoid.
        body: "post" = act(W x + b) (the paper's layer); "pre" = W·act(LN(x)) with W zero-initialised,
            the pre-activation form residual branches need. None: "pre" for residual/gated, else "post".
        reversible: every block a reversible coupling of two width/2 halves (deepres.models.reversible):
            activation memory independent of depth, half the parameters per block.
    """
    check_gate(gate)
    if depth < 2:
        raise ConfigError(f"highway_mlp needs depth >= 2 (1 plain layer + >= 1 block); got depth={depth}.")
    if width < 1:
        raise ConfigError(f"highway_mlp needs width >= 1; got width={width}.")
    body = body or ("pre" if gate in ("residual", "gated") else "post")
    if body not in ("post", "pre"):
        raise ConfigError(f"highway_mlp body must be 'post' or 'pre'; got {body!r}.")
    num_blocks = depth - 1
    tb, cb = resolve_gate_biases(gate, num_blocks, gate_bias, carry_bias)
    stem = DenseBody(in_features, width, activation)  # the paper's one plain layer first
    if reversible:
        check_reversible(gate, width)
        half = width // 2

        def make_body():
            return DenseBody(half, half, activation) if body == "post" else PreActDenseBody(half, half, activation)

        blocks = [reversible_block(gate, make_body, lambda b: dense_gate(half, half, b), tb, cb) for _ in range(num_blocks)]
        return HighwayMLP(stem, ReversibleStack(blocks), nn.Linear(width, num_classes))
    blocks = []
    for _ in range(num_blocks):
        h = DenseBody(width, width, activation) if body == "post" else PreActDenseBody(width, width, activation)
        blocks.append(
            ResidualBlock(
                h, gate,
                transform_gate=dense_gate(width, width, tb) if gate in ("highway", "gated") else None,
                carry_gate=dense_gate(width, width, cb) if gate == "gated" else None,
            )
        )
    return HighwayMLP(stem, BlockStack(blocks), nn.Linear(width, num_classes))


class HighwayCNN(nn.Module):
    def __init__(self, stem: nn.Module, blocks: BlockStack, head: nn.Module):
        super().__init__()
        self.stem, self.blocks, self.head = stem, blocks, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class Transition(nn.Module):
    """Between stages: 2x2 max-pool, then a plain conv layer that changes the width. The only
    places in the net without a carry path (once per stage, as He et al. 2015 do)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.layer = ConvBody(in_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(self.pool(x))


@register_model
def highway_cnn_cifar(
    widths: list[int] = (32, 64, 128),
    blocks_per_stage: list[int] = (5, 5, 6),
    gate: GateKind = "highway",
    gate_bias: GateBias = "auto",
    carry_bias: GateBias = "auto",
    gate_kernel_size: int = 3,
    num_classes: int = 10,
    in_chans: int = 3,
    reversible: bool = False,
) -> HighwayCNN:
    """Conv Highway net for 32x32 images: stem conv, then stages of 3x3 highway conv layers with
    3x3 conv gates, a max-pool + plain conv transition between stages, 1x1 conv classifier and global
    average pooling. Defaults: 1 + 5 + 1 + 5 + 1 + 6 + 1 = 20 weight layers (the paper counts 19),
    ≈ 2.3 M parameters. The paper's released runs use gate_bias=-2. `reversible`: the blocks inside
    each stage become reversible couplings of width/2 halves; the transitions store as usual."""
    check_gate(gate)
    widths, blocks_per_stage = list(widths), list(blocks_per_stage)
    if len(widths) != len(blocks_per_stage) or min(blocks_per_stage) < 1:
        raise ConfigError(f"highway_cnn_cifar needs one width per stage and >= 1 block each; got "
                          f"widths={widths}, blocks_per_stage={blocks_per_stage}.")
    tb, cb = resolve_gate_biases(gate, sum(blocks_per_stage), gate_bias, carry_bias)
    stem = ConvBody(in_chans, widths[0])
    blocks: list[nn.Module] = []
    in_ch = widths[0]
    for stage, (w, n) in enumerate(zip(widths, blocks_per_stage, strict=True)):
        if stage > 0:
            blocks.append(Transition(in_ch, w))
            in_ch = w
        for _ in range(n):
            if reversible:
                check_reversible(gate, w)
                half = w // 2
                blocks.append(reversible_block(
                    gate, lambda half=half: ConvBody(half, half),
                    lambda b, half=half: conv_gate(half, half, b, kernel_size=gate_kernel_size), tb, cb))
                continue
            blocks.append(
                ResidualBlock(
                    ConvBody(w, w), gate,
                    transform_gate=conv_gate(w, w, tb, kernel_size=gate_kernel_size) if gate in ("highway", "gated") else None,
                    carry_gate=conv_gate(w, w, cb, kernel_size=gate_kernel_size) if gate == "gated" else None,
                )
            )
    head = nn.Sequential(nn.Conv2d(in_ch, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return HighwayCNN(stem, (ReversibleStack if reversible else BlockStack)(blocks), head)


@register_model
def plain_mlp(
    widths: list[int] = (2500, 2000, 1500, 1000, 500),
    activation: str = "tanh",
    in_features: int = 784,
    num_classes: int = 10,
) -> HighwayMLP:
    """A plain deep MLP with a width per layer; the default is Ciresan et al. 2010's
    784-2500-2000-1500-1000-500-10 (0.35 % MNIST error with elastic distortions)."""
    widths = list(widths)
    if not widths or min(widths) < 1:
        raise ConfigError(f"plain_mlp needs one or more positive widths; got widths={widths}.")
    stem = DenseBody(in_features, widths[0], activation)
    blocks = [ResidualBlock(DenseBody(a, b, activation), "plain") for a, b in zip(widths, widths[1:], strict=False)]
    return HighwayMLP(stem, BlockStack(blocks), nn.Linear(widths[-1], num_classes))
