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
    depth_aware_transform_bias,
    resolve_gate_biases,
)
from deepres.models.bodies import (
    INIT_NONLINEARITY,
    ConvBody,
    DenseBody,
    FixupDenseBody,
    PreActDenseBody,
    check_norm,
    make_norm,
)
from deepres.models.depth_scaling import (
    DepthScalingName,
    apply_depth_scaling,
    check_depth_scaling,
    init_blocks,
)
from deepres.models.hyper import (
    HYPER_GATES,
    SINKHORN_ITERS,
    HyperBlock,
    PerStream,
    StreamExpand,
    StreamMean,
    StreamMixing,
    check_hyper,
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
from deepres.models.registry import register_model
from deepres.models.reversible import ReversibleStack, check_reversible, reversible_block

# the dense branch each residual preset's paper uses: ReZero/SkipInit/DeepNorm act(W x + b) with no norm
# before it, LayerScale a pre-norm branch, Fixup two layers with scalar biases
_PRESET_BODY = {"rezero": "post", "skipinit": "post", "deepnorm": "post", "layerscale": "pre", "fixup": "fixup"}


def _dense_body(body: str, width: int, activation: str, num_blocks: int, zero_init: bool) -> nn.Module:
    if body == "post":
        return DenseBody(width, width, activation)
    if body == "fixup":
        return FixupDenseBody(width, num_blocks, activation)
    h = PreActDenseBody(width, width, activation, zero_init=zero_init)
    if not zero_init:  # a branch that is scaled instead of zeroed: He init for the layer after act
        nn.init.kaiming_normal_(h.branch.weight, nonlinearity=INIT_NONLINEARITY[activation])
        nn.init.zeros_(h.branch.bias)
    return h


class HighwayMLP(nn.Module):
    def __init__(self, stem: nn.Module, blocks: BlockStack, head: nn.Module):
        super().__init__()
        self.stem, self.blocks, self.head = stem, blocks, head

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x.flatten(1))  # (B, in_features) -> (B, width)

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        return self.head(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exit(self.blocks(self.entry(x)))


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
    init: InitName = "default",
    drop_path: float = 0.0,
    reversible: bool = False,
    streams: int | None = None,
    dynamic: bool = True,
    sinkhorn_iters: int = SINKHORN_ITERS,
    depth_scaling: DepthScalingName = "none",
) -> HighwayMLP:
    """Fully connected net of `depth` hidden layers: 1 plain layer + (depth − 1) blocks.

    Args:
        depth: hidden layers (the paper's 10/20/50/100; SGD still trains at 1000+).
        width: units per layer (paper: 50 highway, 71 plain).
        gate: plain | residual | highway | gated, or a multi-stream member: hc | mhc | mhc_lite
            (deepres.models.hyper, docs/science.md#multi-stream-residuals).
        gate_bias: transform gate bias; "auto" = −ln(L) − 1 for L = depth − 1 blocks
            (paper: −1 … −3; a fixed −3 stops error flow beyond ~100 layers, see
            docs/science.md#the-highway-transform-gate-bias).
        carry_bias: carry gate bias of "gated" blocks; "auto" = ln(L) + 1.
        activation: relu | tanh | gelu | silu | sigmoid.
        body: "post" = act(W x + b) (the paper's layer); "pre" = W·act(LN(x)) with W zero-initialised,
            the pre-activation form residual branches need. None: "pre" for residual/gated, else "post"
            (with a residual preset: the branch its paper uses).
        init: default | rezero | skipinit | layerscale | fixup | deepnorm (gate="residual") |
            orthogonal (gate="plain"); deepres.models.init_presets, docs/science.md#depth-aware-initialisation-presets.
        drop_path: stochastic depth, the drop rate of the last block (linear in the block index).
        reversible: every block a reversible coupling of two width/2 halves (deepres.models.reversible):
            activation memory independent of depth, half the parameters per block.
        streams: residual streams of hc/mhc/mhc_lite (default 4); the stem copies into them, the head averages them.
        dynamic: hc/mhc/mhc_lite mixings computed from the streams (true) or learned constants (false).
        sinkhorn_iters: Sinkhorn–Knopp iterations of mhc (mHC: 20).
        depth_scaling: none | completep: every block's change × 1/L and "auto" gate biases for one block, with
            the matching per-parameter learning rates (deepres.models.depth_scaling).
    """
    n = check_hyper(gate, streams, sinkhorn_iters, reversible=reversible, init=init, dynamic=dynamic)
    if gate in HYPER_GATES:
        check_depth_scaling(depth_scaling, gate, reversible=reversible)
        check_drop_path(drop_path, gate)
        return _hyper_mlp(depth, width, gate, gate_bias, activation, body or "pre", in_features, num_classes,
                          drop_path, n, dynamic, sinkhorn_iters, depth_scaling)
    check_gate(gate)
    check_init(init, gate, conv=False)
    check_depth_scaling(depth_scaling, gate, reversible=reversible)
    check_drop_path(drop_path, gate)
    if depth < 2:
        raise ConfigError(f"highway_mlp needs depth >= 2 (1 plain layer + >= 1 block); got depth={depth}.")
    if width < 1:
        raise ConfigError(f"highway_mlp needs width >= 1; got width={width}.")
    if init == "fixup" and body is not None:
        raise ConfigError("init='fixup' brings its own two-layer branch; leave body unset.")
    body = body or _PRESET_BODY.get(init) or ("pre" if gate in ("residual", "gated") else "post")
    if body not in ("post", "pre", "fixup"):
        raise ConfigError(f"highway_mlp body must be 'post' or 'pre'; got {body!r}.")
    num_blocks = depth - 1
    init_depth = init_blocks(depth_scaling, num_blocks)  # L, or 1 where the depth multiplier takes its place
    tb, cb = resolve_gate_biases(gate, init_depth, gate_bias, carry_bias)
    stem = DenseBody(in_features, width, activation)  # the paper's one plain layer first
    if reversible:
        check_reversible(gate, width, init, drop_path)
        half = width // 2

        def make_body():
            return DenseBody(half, half, activation) if body == "post" else PreActDenseBody(half, half, activation)

        blocks = [reversible_block(gate, make_body, lambda b: dense_gate(half, half, b), tb, cb) for _ in range(num_blocks)]
        return HighwayMLP(stem, ReversibleStack(blocks), nn.Linear(width, num_classes))
    blocks = []
    for _ in range(num_blocks):
        h = _dense_body(body, width, activation, init_depth, zero_init=init == "default")
        init_branch_(h, init, init_depth)
        blocks.append(
            ResidualBlock(
                h, gate,
                transform_gate=dense_gate(width, width, tb) if gate in ("highway", "gated") else None,
                carry_gate=dense_gate(width, width, cb) if gate == "gated" else None,
                post=nn.LayerNorm(width) if init == "deepnorm" else None,  # DeepNorm is Post-LN
                **block_scales(init, init_depth, width),
            )
        )
    model = HighwayMLP(stem, BlockStack(blocks), nn.Linear(width, num_classes))
    _finish(model, init, drop_path, activation)
    apply_depth_scaling(model.blocks, depth_scaling, num_blocks)
    return model


def _hyper_mlp(depth: int, width: int, gate: str, gate_bias: GateBias, activation: str, body: str, in_features: int,
               num_classes: int, drop_path: float, streams: int, dynamic: bool, sinkhorn_iters: int,
               depth_scaling: str = "none") -> HighwayMLP:
    """highway_mlp on `streams` residual streams: the plain layer, copied into the streams, then
    depth − 1 multi-stream blocks, the mean of the streams, the classifier. `gate_bias` is the logit of
    H^post = 2σ(b) at init ("auto": −ln(L) − 1; 0: the papers' H^post = 1; under depth_scaling completep
    the 1/L multiplier takes the place of that depth dependence, and "auto" is resolved for one block)."""
    if depth < 2 or width < 1:
        raise ConfigError(f"highway_mlp needs depth >= 2 and width >= 1; got depth={depth}, width={width}.")
    if body not in ("post", "pre"):
        raise ConfigError(f"highway_mlp body must be 'post' or 'pre'; got {body!r}.")
    num_blocks = depth - 1
    init_depth = init_blocks(depth_scaling, num_blocks)  # L, or 1 where the depth multiplier takes its place
    post_logit = depth_aware_transform_bias(init_depth) if gate_bias == "auto" else float(gate_bias)
    blocks = [
        HyperBlock(_dense_body(body, width, activation, init_depth, zero_init=True),
                   StreamMixing(gate, streams, width, k, dynamic=dynamic, sinkhorn_iters=sinkhorn_iters,
                                post_logit=post_logit),
                   drop_rate=drop_path * (k + 1) / num_blocks)  # the linear rule of BlockStack.set_drop_path
        for k in range(num_blocks)
    ]
    stem = nn.Sequential(DenseBody(in_features, width, activation), StreamExpand(streams))
    model = HighwayMLP(stem, BlockStack(blocks), nn.Sequential(StreamMean(), nn.Linear(width, num_classes)))
    apply_depth_scaling(model.blocks, depth_scaling, num_blocks)
    return model


def _finish(model: nn.Module, init: str, drop_path: float, activation: str = "relu") -> None:
    """The whole-model parts of a preset (classifier, plain-net criticality) and stochastic depth."""
    if init == "fixup":
        zero_classifier_(model.head)
    elif init in ("orthogonal", "delta_orthogonal"):
        plain_init_(model, activation)
    if drop_path:
        model.blocks.set_drop_path(drop_path)


class HighwayCNN(nn.Module):
    def __init__(self, stem: nn.Module, blocks: BlockStack, head: nn.Module):
        super().__init__()
        self.stem, self.blocks, self.head = stem, blocks, head

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        return self.head(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exit(self.blocks(self.entry(x)))


class Transition(nn.Module):
    """Between stages: 2x2 max-pool, then a plain conv layer that changes the width. The only
    places in the net without a carry path (once per stage, as He et al. 2015 do)."""

    def __init__(self, in_ch: int, out_ch: int, norm: str = "batch"):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.layer = ConvBody(in_ch, out_ch, norm=norm)

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
    init: InitName = "default",
    norm: str | None = None,
    drop_path: float = 0.0,
    reversible: bool = False,
    streams: int | None = None,
    dynamic: bool = True,
    sinkhorn_iters: int = SINKHORN_ITERS,
) -> HighwayCNN:
    """Conv Highway net for 32x32 images: stem conv, then stages of 3x3 highway conv layers with
    3x3 conv gates, a max-pool + plain conv transition between stages, 1x1 conv classifier and global
    average pooling. Defaults: 1 + 5 + 1 + 5 + 1 + 6 + 1 = 20 weight layers (the paper counts 19),
    ≈ 2.3 M parameters. The paper's released runs use gate_bias=-2.

    `init`: default | rezero | skipinit | layerscale | fixup | deepnorm (gate="residual") |
    delta_orthogonal (gate="plain"); `norm`: batch | group | layer | none (unset: none for the
    norm-free presets, else batch); `drop_path`: stochastic depth rate of the last block.
    `reversible`: the blocks inside each stage become reversible couplings of width/2 halves; the
    transitions store as usual.
    `gate`: also hc | mhc | mhc_lite on `streams` residual streams (`dynamic`, `sinkhorn_iters`; see
    highway_mlp): the stem copies into the streams, each transition runs on every stream alike, the head
    averages them."""
    n = check_hyper(gate, streams, sinkhorn_iters, reversible=reversible, init=init, dynamic=dynamic)
    if gate in HYPER_GATES:
        check_drop_path(drop_path, gate)
        return _hyper_cnn(list(widths), list(blocks_per_stage), gate, gate_bias, num_classes, in_chans,
                          resolve_norm(norm, init), drop_path, n, dynamic, sinkhorn_iters)
    check_gate(gate)
    check_init(init, gate, conv=True)
    check_drop_path(drop_path, gate)
    norm = resolve_norm(norm, init)
    check_norm(norm)
    body_norm = "scalar_bias" if init == "fixup" else norm
    widths, blocks_per_stage = list(widths), list(blocks_per_stage)
    if len(widths) != len(blocks_per_stage) or min(blocks_per_stage) < 1:
        raise ConfigError(f"highway_cnn_cifar needs one width per stage and >= 1 block each; got "
                          f"widths={widths}, blocks_per_stage={blocks_per_stage}.")
    tb, cb = resolve_gate_biases(gate, sum(blocks_per_stage), gate_bias, carry_bias)
    num_blocks = sum(blocks_per_stage)
    stem = ConvBody(in_chans, widths[0], norm=body_norm)
    blocks: list[nn.Module] = []
    in_ch = widths[0]
    for stage, (w, n) in enumerate(zip(widths, blocks_per_stage, strict=True)):
        if stage > 0:
            blocks.append(Transition(in_ch, w, norm=body_norm))
            in_ch = w
        for _ in range(n):
            if reversible:
                check_reversible(gate, w, init, drop_path)
                half = w // 2
                blocks.append(reversible_block(
                    gate, lambda half=half: ConvBody(half, half, norm=body_norm),
                    lambda b, half=half: conv_gate(half, half, b, kernel_size=gate_kernel_size), tb, cb))
                continue
            h = ConvBody(w, w, norm=body_norm)
            if init == "fixup":  # Fixup needs m >= 2 layers per branch: a zero-initialised 1x1 conv ends it
                h.append(nn.Conv2d(w, w, 1))
            init_branch_(h, init, num_blocks)
            blocks.append(
                ResidualBlock(
                    h, gate,
                    post=make_norm(norm, w) if init == "deepnorm" else None,
                    **block_scales(init, num_blocks, w, spatial_dims=2),
                    transform_gate=conv_gate(w, w, tb, kernel_size=gate_kernel_size) if gate in ("highway", "gated") else None,
                    carry_gate=conv_gate(w, w, cb, kernel_size=gate_kernel_size) if gate == "gated" else None,
                )
            )
    head = nn.Sequential(nn.Conv2d(in_ch, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = HighwayCNN(stem, (ReversibleStack if reversible else BlockStack)(blocks), head)
    _finish(model, init, drop_path)
    return model


def _hyper_cnn(widths: list[int], blocks_per_stage: list[int], gate: str, gate_bias: GateBias, num_classes: int,
               in_chans: int, norm: str, drop_path: float, streams: int, dynamic: bool,
               sinkhorn_iters: int) -> HighwayCNN:
    """highway_cnn_cifar on `streams` residual streams, each block a conv body with stream mixings."""
    check_norm(norm)
    if len(widths) != len(blocks_per_stage) or min(blocks_per_stage) < 1:
        raise ConfigError(f"highway_cnn_cifar needs one width per stage and >= 1 block each; got "
                          f"widths={widths}, blocks_per_stage={blocks_per_stage}.")
    num_blocks = sum(blocks_per_stage)
    post_logit = depth_aware_transform_bias(num_blocks) if gate_bias == "auto" else float(gate_bias)
    blocks: list[nn.Module] = []
    in_ch, k = widths[0], 0
    for stage, (w, count) in enumerate(zip(widths, blocks_per_stage, strict=True)):
        if stage > 0:
            blocks.append(PerStream(Transition(in_ch, w, norm=norm)))
            in_ch = w
        for _ in range(count):
            k += 1
            blocks.append(HyperBlock(ConvBody(w, w, norm=norm),
                                     StreamMixing(gate, streams, w, k - 1, dynamic=dynamic,
                                                  sinkhorn_iters=sinkhorn_iters, post_logit=post_logit),
                                     drop_rate=drop_path * k / num_blocks))
    stem = nn.Sequential(ConvBody(in_chans, widths[0], norm=norm), StreamExpand(streams))
    head = nn.Sequential(StreamMean(), nn.Conv2d(in_ch, num_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return HighwayCNN(stem, BlockStack(blocks), head)


@register_model
def plain_mlp(
    widths: list[int] = (2500, 2000, 1500, 1000, 500),
    activation: str = "tanh",
    in_features: int = 784,
    num_classes: int = 10,
    init: Literal["default", "orthogonal"] = "default",
) -> HighwayMLP:
    """A plain deep MLP with a width per layer; the default is Ciresan et al. 2010's
    784-2500-2000-1500-1000-500-10 (0.35 % MNIST error with elastic distortions).
    `init`: default (He) or orthogonal at criticality (deepres.models.init_presets)."""
    check_init(init, "plain", conv=False)
    widths = list(widths)
    if not widths or min(widths) < 1:
        raise ConfigError(f"plain_mlp needs one or more positive widths; got widths={widths}.")
    stem = DenseBody(in_features, widths[0], activation)
    blocks = [ResidualBlock(DenseBody(a, b, activation), "plain") for a, b in zip(widths, widths[1:], strict=False)]
    model = HighwayMLP(stem, BlockStack(blocks), nn.Linear(widths[-1], num_classes))
    _finish(model, init, 0.0, activation)
    return model
