"""The residual family: every block computes  y = g(x)·x + t(x)·h(x).

    gate        carry g(x)        transform t(x)      reference
    plain       0                 1                   the baseline that stops training with depth
    residual    1                 1                   He et al. 2015 ("an open-gated Highway net")
    highway     1 − t(x)          σ(W_t x + b_t)      Srivastava et al. 2015 (coupled gates)
    gated       σ(W_g x + b_g)    σ(W_t x + b_t)      uncoupled Highway / gated residual

`h` is the block's *body* (dense, basic conv, bottleneck conv, or their pre-activation forms);
the gate kind is orthogonal to the body, so `ResNet-50` becomes `Highway-ResNet-50` by changing
one argument. Where a block changes the shape (stride or channels) the carry path goes through a
`shortcut` projection, the only place where the carry weight is not exactly 1.0.

Every block starts close to the identity (docs/science.md#the-highway-transform-gate-bias):
  - residual/gated bodies end in a zero-initialised norm or layer;
  - the Highway transform bias defaults to −ln(L) − 1 for L blocks, so the carry product
    (1 − σ(b))^L ≈ exp(−1/e) ≈ 0.69 at any depth (a fixed −3 gives 0.953^L: 1e-21 at L = 1000);
  - the carry bias of `gated` blocks defaults to +ln(L) + 1 (open by the same argument).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, noop_context_fn

from deepres.errors import ConfigError
from deepres.models.fused_gate import gated_mix, highway_mix

log = logging.getLogger("deepres")

GateKind = Literal["plain", "residual", "highway", "gated"]
GATES: tuple[str, ...] = ("plain", "residual", "highway", "gated")
GateBias = float | Literal["auto"]


# ----------------------------------------------------------------------------------------------
# Depth-aware gate initialisation
# ----------------------------------------------------------------------------------------------
def depth_aware_transform_bias(num_blocks: int) -> float:
    """−ln(L) − 1: keeps L·σ(b) ≈ 1/e, so the error carried through L blocks stays ≈ 0.69."""
    return -math.log(max(num_blocks, 1)) - 1.0


def carry_product(transform_bias: float, num_blocks: int) -> float:
    """(1 − σ(b))^L: the factor by which the carry path alone scales the error at init."""
    return (1.0 - 1.0 / (1.0 + math.exp(-transform_bias))) ** num_blocks


def resolve_gate_biases(
    gate: str, num_blocks: int, transform_bias: GateBias, carry_bias: GateBias
) -> tuple[float, float]:
    """Turn "auto" into the depth-aware values and warn when the carry path starts closed."""
    check_gate(gate)
    tb = depth_aware_transform_bias(num_blocks) if transform_bias == "auto" else float(transform_bias)
    cb = -depth_aware_transform_bias(num_blocks) if carry_bias == "auto" else float(carry_bias)
    if gate == "highway":
        product = carry_product(tb, num_blocks)
        if product < 0.1:
            log.warning(
                "highway net with %d blocks and transform gate bias %.2f starts with carry product "
                "(1 - sigmoid(b))^L = %.1e < 0.1: the error reaching the first block is scaled by about "
                "that much and deep layers will barely train. Fix: use the depth-aware default "
                "(gate_bias='auto' = -ln(L) - 1 = %.2f) or a bias below %.2f.",
                num_blocks, tb, product, depth_aware_transform_bias(num_blocks),
                _bias_for_product(0.1, num_blocks),
            )
    if gate == "gated":
        product = (1.0 / (1.0 + math.exp(-cb))) ** num_blocks
        if product < 0.1:
            log.warning(
                "gated net with %d blocks and carry gate bias %.2f starts with carry product "
                "sigmoid(b)^L = %.1e < 0.1. Fix: use carry_bias='auto' (= ln(L) + 1 = %.2f).",
                num_blocks, cb, product, -depth_aware_transform_bias(num_blocks),
            )
    return tb, cb


def _bias_for_product(target: float, num_blocks: int) -> float:
    t = 1.0 - target ** (1.0 / num_blocks)  # σ(b) that gives the target carry product
    return math.log(t / (1.0 - t))


def check_gate(gate: str) -> None:
    if gate not in GATES:
        raise ConfigError(f"unknown gate {gate!r}. Valid gates: {', '.join(GATES)}.")


def check_gate_modules(gate: str, transform_gate: nn.Module | None, carry_gate: nn.Module | None,
                       unit: str = "block") -> None:
    """Refuse a highway or gated `unit` built without the gate modules its kind computes with."""
    if gate in ("highway", "gated") and transform_gate is None:
        raise ValueError(f"a {gate} {unit} needs a transform gate")
    if gate == "gated" and carry_gate is None:
        raise ValueError(f"a gated {unit} needs a carry gate")


# ----------------------------------------------------------------------------------------------
# Gates
# ----------------------------------------------------------------------------------------------
class GateActivation(nn.Sigmoid):
    """The σ of a gate, as its own module so that outside code (deepres.observability.diagnostics) can hook
    every gate's openness without the model doing anything for it."""


class Gate(nn.Module):
    """σ(W x + b), one value per output unit. `pin(v)` fixes it to the constant v (for analysis)."""

    def __init__(self, proj: nn.Module, bias: float):
        super().__init__()
        self.proj = proj
        self.act = GateActivation()
        self.initial_bias = bias
        self.pinned: float | None = None
        self.reset_bias()

    def reset_bias(self) -> None:
        if self.proj.bias is not None:
            nn.init.constant_(self.proj.bias, self.initial_bias)

    def pin(self, value: float | None) -> None:
        self.pinned = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pinned is not None:
            return x.new_full((), self.pinned)
        return self.act(self.proj(x))


def dense_gate(in_features: int, out_features: int, bias: float) -> Gate:
    return Gate(nn.Linear(in_features, out_features), bias)


class GroupedPointwiseConv(nn.Conv2d):
    """A grouped 1×1 conv, computed on CPU as one matmul batched over the groups.

    PyTorch's CPU convolution runs a grouped conv group by group (a slice copy and a small conv per
    group: 741 calls and 2,800 copies per Highway-ResNet-50 training step); as a batched matmul the
    same conv takes 0.46× the time at 256 channels and 56², about the same at 1024 channels (forward +
    backward, measured). Same parameters as nn.Conv2d; other devices and channels-last inputs use conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.groups == 1 or not x.is_contiguous():
            return super().forward(x)
        if self.stride != (1, 1):
            x = x[:, :, :: self.stride[0], :: self.stride[1]]
        b, c, h, w = x.shape
        g = self.groups
        weight = self.weight.view(g, self.out_channels // g, c // g)
        y = torch.matmul(weight, x.reshape(b, g, c // g, h * w)).view(b, self.out_channels, h, w)
        return y if self.bias is None else y + self.bias.to(y.dtype).view(1, -1, 1, 1)


def conv_gate(
    in_ch: int, out_ch: int, bias: float, stride: int = 1, kernel_size: int = 1, group_width: int | None = None
) -> Gate:
    """A convolutional gate. `group_width` channels per group keeps it cheap in wide nets:
    a full 1×1 gate would double a bottleneck block's cost, one with 16 channels per group adds ~6 %
    of its FLOPs."""
    groups = 1
    if group_width:
        groups = math.gcd(math.gcd(in_ch, out_ch), max(1, min(in_ch, out_ch) // group_width))
    cls = GroupedPointwiseConv if kernel_size == 1 and groups > 1 else nn.Conv2d
    conv = cls(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, groups=groups, bias=True)
    return Gate(conv, bias)


# ----------------------------------------------------------------------------------------------
# The block
# ----------------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """y = post( g(x)·s(x) + t(x)·h(x) ), s the shortcut (identity unless the shape changes).

    `post` is the activation applied after the merge in the original ResNet (post-activation);
    pre-activation bodies leave it out (He et al. 2016).
    """

    def __init__(
        self,
        body: nn.Module,
        gate: GateKind = "residual",
        *,
        shortcut: nn.Module | None = None,
        transform_gate: Gate | None = None,
        carry_gate: Gate | None = None,
        post: nn.Module | None = None,
        shortcut_from_body_input: bool = False,
        branch_scale: nn.Module | None = None,
        carry_scale: float = 1.0,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        check_gate(gate)
        check_gate_modules(gate, transform_gate, carry_gate)
        self.gate = gate
        self.body = body
        self.shortcut = shortcut
        self.transform_gate = transform_gate if gate in ("highway", "gated") else None
        self.carry_gate = carry_gate if gate == "gated" else None
        self.post = post
        # Pre-activation bodies feed the shortcut projection from their pre-activated input.
        self.shortcut_from_body_input = shortcut_from_body_input
        # bodies whose output autograd does not keep take the shortcut in place (deepres.models.bodies)
        self.add_in_place = getattr(body, "output_not_saved", False)
        # Depth-aware presets (deepres.models.init_presets): a scale on the transform path h (ReZero,
        # SkipInit, LayerScale, Fixup) and a constant scale on the carry path (DeepNorm's α).
        self.branch_scale = branch_scale
        self.carry_scale = float(carry_scale)
        # Stochastic depth (docs/science.md#stochastic-depth): in training each sample skips this
        # block's transform with probability drop_rate and takes the carry path alone.
        self.drop_rate = float(drop_rate)

    # σ and the mix as one autograd op (deepres.models.fused_gate); False: the separate ops
    fused_gate = True
    # fixed multiplier m on the block's change, y = s + m·(merge − s) (deepres.models.depth_scaling); 1: off
    depth_multiplier = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = self._keep_mask(x) if self.drop_rate > 0.0 and self.training else None
        carry_in = x
        if keep is False:  # every sample of the batch skips the block: no transform, no gradient
            if self.shortcut_from_body_input:
                carry_in = self.body.preact(x)
            y = self._carry(x, carry_in)
            return y if self.post is None else self.post(y)
        if self.shortcut_from_body_input:
            carry_in = self.body.preact(x)
            h = self.body.branch(carry_in)
        else:
            h = self.body(x)
        if self.branch_scale is not None:
            h = self.branch_scale(h)
        if self.gate == "plain":
            y = h
        else:
            s = self._carry(x, carry_in)
            if self.gate == "residual":
                if keep is not None:
                    h = h * keep
                y = h.add_(s) if self.add_in_place else s + h
            elif self.gate == "highway":
                if keep is None and self.fused_gate and _fusable(self.transform_gate):
                    y = highway_mix(s, self.transform_gate.proj(x), h)  # σ and the mix as one op
                else:
                    t = self.transform_gate(x)
                    d = t * (h - s)  # y = (1 − t)·s + t·h = s + t·(h − s), one multiply fewer
                    y = s + (d if keep is None else d * keep)
            elif keep is None and self.fused_gate and _fusable(self.transform_gate) and _fusable(self.carry_gate):
                y = gated_mix(s, self.carry_gate.proj(x), self.transform_gate.proj(x), h)
            else:
                y = self.carry_gate(x) * s + self.transform_gate(x) * h
                if keep is not None:  # a dropped sample carries its input: y = s
                    y = s + (y - s) * keep
            if self.depth_multiplier != 1.0:
                y = torch.lerp(s, y, self.depth_multiplier)
        return y if self.post is None else self.post(y)

    def _carry(self, x: torch.Tensor, carry_in: torch.Tensor) -> torch.Tensor:
        s = x if self.shortcut is None else self.shortcut(carry_in)
        return s if self.carry_scale == 1.0 else s * self.carry_scale

    def _keep_mask(self, x: torch.Tensor) -> torch.Tensor | bool:
        """Per-sample keep mask scaled by 1/(1 − p) (as timm's drop_path), shaped to broadcast over x;
        False when no sample keeps the block (checked on CPU only: on an accelerator it would sync)."""
        survival = 1.0 - self.drop_rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(survival)
        if x.device.type == "cpu" and not bool(keep.any()):
            return False
        return keep.div_(survival)

    def extra_repr(self) -> str:
        extra = [f"gate={self.gate}"]
        if self.carry_scale != 1.0:
            extra.append(f"carry_scale={self.carry_scale:.4g}")
        if self.drop_rate:
            extra.append(f"drop_rate={self.drop_rate:.4g}")
        if self.depth_multiplier != 1.0:
            extra.append(f"depth_multiplier={self.depth_multiplier:.4g}")
        return ", ".join(extra)


def _fusable(gate: Gate) -> bool:
    """The fused op skips the Gate module: only when nothing watches or pins it (diagnostics hook
    gates, and then get the separate ops)."""
    return (gate.pinned is None and not gate._forward_hooks and not gate._forward_pre_hooks
            and not gate.act._forward_hooks and not nn.modules.module._global_forward_hooks)


# ----------------------------------------------------------------------------------------------
# The stack of blocks every model exposes as `.blocks`
# ----------------------------------------------------------------------------------------------
class BlockStack(nn.ModuleList):
    """The repeated structure of a model: `x = block(x)` for every block in order.

    Outside code walks it (diagnostics, compile, pipeline stages) and sets `checkpoint_every`
    (see deepres.parallelize.activation_checkpoint) without changing the model's code or parameter names.
    A block may carry a tuple of tensors (e.g. the (h, c) state of a depth-LSTM).
    """

    def __init__(self, blocks=None):
        super().__init__(blocks)
        self.checkpoint_every = 0  # 0: off; k: recompute every k consecutive blocks in backward
        # torch.utils.checkpoint's context_fn: e.g. selective checkpointing (deepres.parallelize.activation_checkpoint)
        self.checkpoint_context_fn = noop_context_fn
        # observer(i, y) after block i of a forward (deepres.observability.depth_probe): one call per block instead
        # of two forward hooks per block; never called by a checkpoint's recomputation. observer(None, None): the
        # forward since the last call does not count (its gate values are dropped)
        self.observer: Callable[[int, object], None] | None = None

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth with the linear rule of Huang et al. 2016: block l of L (1-based) is
        skipped with probability rate·l/L, so the last block's rate is `rate`."""
        n = len(self)
        for i, block in enumerate(self):
            if isinstance(block, ResidualBlock) and block.gate != "plain":
                block.drop_rate = rate * (i + 1) / n

    def forward(self, x):
        k = self.checkpoint_every
        observe = self.observer
        if k <= 0 or not torch.is_grad_enabled():
            if observe is None:
                for block in self:
                    x = block(x)
            else:
                for i, block in enumerate(self):
                    x = block(x)
                    observe(i, x)
            return x
        blocks = list(self)
        last = (len(blocks) - 1) // k * k
        for start in range(0, last, k):
            x = checkpoint(_Segment(blocks[start : start + k], start, observe), x, use_reentrant=False,
                           context_fn=self.checkpoint_context_fn)
        # The last segment is not checkpointed: backward needs its activations first, so storing
        # them costs one segment of memory and saves recomputing it.
        for i, block in enumerate(blocks[last:], last):
            x = block(x)
            if observe is not None:
                observe(i, x)
        return x


class _Segment:
    """Runs consecutive blocks; on its second call (the backward recomputation) batch-norm
    running statistics are frozen, so checkpointing does not update them twice, and the
    observer is not called again."""

    def __init__(self, blocks: list[nn.Module], start: int = 0, observe=None):
        self.blocks = blocks
        self.start, self.observe = start, observe
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        observe = self.observe if self.calls == 1 else None
        if self.calls == 1:
            # blocks whose gate is watched now (the diagnostics' hooks, removed before backward) run the
            # separate gate ops; the recomputation must run the same ops, or it saves other tensors
            self.unfused = [b for b in self.blocks if isinstance(b, ResidualBlock) and b.fused_gate
                            and not _block_fusable(b)]
        with _frozen_running_stats(self.blocks) if self.calls > 1 else contextlib.nullcontext(), \
                _separate_gate_ops(self.unfused if self.calls > 1 else []):
            for i, block in enumerate(self.blocks, self.start):
                x = block(x)
                if observe is not None:
                    observe(i, x)
        return x


def _block_fusable(block: ResidualBlock) -> bool:
    gates = [g for g in (block.transform_gate, block.carry_gate) if g is not None]
    return all(_fusable(g) for g in gates)


@contextlib.contextmanager
def _separate_gate_ops(blocks: list[ResidualBlock]):
    for b in blocks:
        b.fused_gate = False
    try:
        yield
    finally:
        for b in blocks:
            del b.fused_gate  # back to the class default


class _frozen_running_stats:
    def __init__(self, blocks: list[nn.Module]):
        self.norms = [m for b in blocks for m in b.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    # No tensor op here: selective checkpointing replays the recompute op by op against the forward.
    def __enter__(self):
        self.saved = [(m, m.momentum, m.num_batches_tracked) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0  # running = (1 − 0)·running + 0·batch: unchanged
            m.num_batches_tracked = None  # so the recompute does not count the batch again

    def __exit__(self, *exc):
        for m, momentum, nbt in self.saved:
            m.momentum = momentum
            m.num_batches_tracked = nbt
        return False


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=False),
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}. Valid activations: {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]()


__all__ = [
    "GATES", "BlockStack", "Gate", "GateActivation", "ResidualBlock", "carry_product", "check_gate", "conv_gate", "dense_gate",
    "depth_aware_transform_bias", "make_activation", "resolve_gate_biases",
]
