"""Reversible blocks: activation memory that does not grow with depth (docs/science.md#reversible-blocks).

A reversible block splits its input into two channel halves and updates each from the other
(the additive coupling of RevNets, Gomez et al. 2017), with the block family's gates:

    y₁ = c_f(x₂)·x₁ + t_f(x₂)·F(x₂)
    y₂ = c_g(y₁)·x₂ + t_g(y₁)·G(y₁)

    gate        carry c(z)                transform t(z)
    residual    1                         1                 (RevNet)
    highway     1 − (1 − ε)·σ(W_t z)      σ(W_t z)          (coupled Highway, on one half)
    gated       ε + (1 − ε)·σ(W_g z)      σ(W_t z)

ε = CARRY_FLOOR keeps the carry away from 0, where the inverse below would divide by zero (a σ
that rounds to exactly 1 in float32 is not rare once logits pass 17): an error in y reaches x
multiplied by 1/c ≤ 1/ε per coupling. The depth-aware gate biases start every carry near 1.

The carry and transform of each half depend only on the *other* half, so the block inverts exactly:

    x₂ = (y₂ − t_g(y₁)·G(y₁)) / c_g(y₁)
    x₁ = (y₁ − t_f(x₂)·F(x₂)) / c_f(x₂)

`ReversibleStack` runs every maximal run of consecutive reversible blocks as one
`torch.autograd.Function` that keeps only the run's output: backward walks the run from its end,
rebuilds each block's input from its output and recomputes one coupling at a time to get the
gradients, so stored activations are one block's worth per run, whatever its length, and the
autograd graph has one node per run (the parameters' gradients are accumulated by the recomputation's
own small graphs, so DDP with find_unused_parameters=True, which looks for them in the forward graph,
would not see them; deepres refuses that combination). Blocks that
change the shape (stride, channels) are ordinary blocks and store their activations as usual.

Bodies must be deterministic (no dropout): the recomputation must see the same function. Batch-norm
running statistics are frozen during the recomputation, as in activation checkpointing.
"""

from __future__ import annotations

import torch
from torch import nn

from deepres.errors import ConfigError
from deepres.models.blocks import BlockStack, Gate, _frozen_running_stats, check_gate_modules

REVERSIBLE_GATES = ("residual", "highway", "gated")
CARRY_FLOOR = 0.01  # the smallest carry weight of a reversible highway / gated coupling


def check_reversible(gate: str, channels: int, init: str = "default", drop_path: float = 0.0) -> None:
    """Refuse what has no exact inverse, or is not built for reversible couplings, before anything is built."""
    if init != "default" or drop_path:
        raise ConfigError(
            f"reversible blocks are built with the default initialisation and no stochastic depth; got "
            f"init={init!r}, drop_path={drop_path}. Use reversible=false for the init presets and drop_path."
        )
    if gate not in REVERSIBLE_GATES:
        raise ConfigError(
            f"reversible blocks need a carry path to invert; gate={gate!r} has none. "
            f"Use one of {', '.join(REVERSIBLE_GATES)}, or reversible=false."
        )
    if channels % 2:
        raise ConfigError(
            f"reversible blocks split the {channels} channels/units into two equal halves; "
            f"use an even width, or reversible=false."
        )


class Coupling(nn.Module):
    """One half of a reversible block: z ↦ (carry c(z) or None for 1, shift t(z)·F(z)).

    The half it updates is y = c·x + shift; the attribute names `transform_gate` / `carry_gate` are
    those of ResidualBlock, so deepres.observability.diagnostics finds the gates the same way."""

    def __init__(self, body: nn.Module, gate: str, transform_gate: Gate | None = None,
                 carry_gate: Gate | None = None):
        super().__init__()
        if gate not in REVERSIBLE_GATES:
            raise ConfigError(f"reversible coupling gate must be one of {', '.join(REVERSIBLE_GATES)}; got {gate!r}.")
        check_gate_modules(gate, transform_gate, carry_gate, unit="reversible coupling")
        self.gate = gate
        self.body = body
        self.transform_gate = transform_gate if gate != "residual" else None
        self.carry_gate = carry_gate if gate == "gated" else None

    def trainable(self) -> list[nn.Parameter]:
        """The parameters that need gradients, listed when backward reaches this coupling (a list
        built in forward and held until backward would be memory that grows with depth)."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        h = self.body(z)
        if self.gate == "residual":
            return None, h
        t = self.transform_gate(z)
        if self.gate == "highway":
            carry = 1 - (1 - CARRY_FLOOR) * t
        else:
            carry = CARRY_FLOOR + (1 - CARRY_FLOOR) * self.carry_gate(z)
        return carry, t * h


def couple(x: torch.Tensor, carry: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor:
    return x + shift if carry is None else carry * x + shift


def uncouple(y: torch.Tensor, carry: torch.Tensor | None, shift: torch.Tensor) -> torch.Tensor:
    return y - shift if carry is None else (y - shift) / carry


class ReversibleBlock(nn.Module):
    """y = (y₁, y₂) from x = (x₁, x₂) as in the module docstring. Called with a tensor it splits and
    joins the channel dimension (dim 1); called with a pair it returns a pair (how ReversibleStack
    runs a sequence of blocks without copying)."""

    def __init__(self, f: Coupling, g: Coupling):
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x):
        pair = isinstance(x, tuple)
        x1, x2 = x if pair else x.chunk(2, dim=1)
        y1 = couple(x1, *self.f(x2))
        y2 = couple(x2, *self.g(y1))
        return (y1, y2) if pair else torch.cat([y1, y2], dim=1)

    @torch.no_grad()
    def inverse(self, y):
        pair = isinstance(y, tuple)
        y1, y2 = y if pair else y.chunk(2, dim=1)
        x2 = uncouple(y2, *self.g(y1))
        x1 = uncouple(y1, *self.f(x2))
        return (x1, x2) if pair else torch.cat([x1, x2], dim=1)

    def compile(self, *args, **kwargs) -> None:
        """Compile the two couplings, not the block: backward calls them directly."""
        self.f.compile(*args, **kwargs)
        self.g.compile(*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# A run of reversible blocks: one autograd node for the whole run, activations rebuilt in backward
# ----------------------------------------------------------------------------------------------
class _Run:
    """What the run's backward needs besides tensors: its blocks and the autocast state of the forward."""

    def __init__(self, blocks: list[ReversibleBlock], device_type: str):
        self.blocks = blocks
        self.device_type = device_type
        self.autocast = torch.is_autocast_enabled(device_type)
        self.autocast_dtype = torch.get_autocast_dtype(device_type)


def _coupling_backward(coupling: Coupling, y: torch.Tensor, z: torch.Tensor, dy: torch.Tensor,
                       params: list[torch.Tensor] | None):
    """For y = c(z)·x + s(z): rebuild x, return (x, dL/dx, dL/dz), and accumulate dL/dθ into the
    parameters' .grad (through their gradient accumulators, so DDP's and ZeRO's hooks fire as in any
    backward) unless `params` is None. One forward of the coupling, with autograd, per call."""
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        carry, shift = coupling(z)
    with torch.no_grad():
        x = uncouple(y, None if carry is None else carry.detach(), shift.detach())
    outputs, grad_outputs = [shift], [dy.to(shift.dtype)]
    if carry is not None and carry.requires_grad:
        outputs.append(carry)
        grad_outputs.append((dy * x).to(carry.dtype))
    if params is None:
        (dz,) = torch.autograd.grad(outputs, [z], grad_outputs, allow_unused=True)
    else:
        torch.autograd.backward(outputs, grad_outputs, inputs=[z, *params])
        dz = z.grad
    dz = dz if dz is not None else torch.zeros_like(z)
    dx = dy if carry is None else dy * carry.detach()
    return x, dx, dz


class ReversibleRunFunction(torch.autograd.Function):
    """A run of consecutive reversible blocks as one autograd node. Forward runs the blocks without
    autograd and keeps only the run's output; backward walks the blocks from the end, rebuilds each
    block's input from its output, recomputes one coupling at a time and accumulates its parameters'
    gradients as it goes (block by block, so DDP buckets and ZeRO reductions start during backward).

    The parameters are not inputs of the node: an autograd edge and gradient accumulator per parameter
    for the whole forward is the bookkeeping that would grow with depth. `anchor`, an empty leaf that
    requires grad, stands for them: backward runs even when the run's input needs no gradient, and the
    parameters' gradients are accumulated only when the engine would accumulate the anchor's, i.e. in
    `loss.backward()`, not in `torch.autograd.grad(...)` or `backward(inputs=...)` calls that ask for
    other tensors (those see the run's input gradient only)."""

    @staticmethod
    def forward(ctx, x, run, anchor):
        pair = x.chunk(2, dim=1)
        for block in run.blocks:
            pair = block(pair)
        y = torch.cat(pair, dim=1)
        ctx.run = run
        ctx.out, ctx.out_version = y.detach(), y._version
        return y

    @staticmethod
    def backward(ctx, grad_y):
        run, y = ctx.run, ctx.out
        if y._version != ctx.out_version:
            raise RuntimeError("the output of a reversible run was modified in place after the forward; "
                               "backward needs it to rebuild the inputs. Clone it before modifying it.")
        y1, y2 = y.chunk(2, dim=1)
        g1, g2 = grad_y.chunk(2, dim=1)
        accumulate = _will_run(ctx.anchor_node)
        with torch.autocast(run.device_type, dtype=run.autocast_dtype, enabled=run.autocast), \
                _frozen_running_stats(run.blocks):
            for block in reversed(run.blocks):
                x2, g2, dz = _coupling_backward(block.g, y2, y1, g2, block.g.trainable() if accumulate else None)
                g1 = g1 + dz.to(g1.dtype)
                x1, g1, dz = _coupling_backward(block.f, y1, x2, g1, block.f.trainable() if accumulate else None)
                g2 = g2 + dz.to(g2.dtype)
                y1, y2 = x1, x2
        return torch.cat([g1, g2], dim=1), None, None


def _will_run(node) -> bool:
    """Whether the current backward executes `node` (a gradient accumulator): torch's own test, the one
    behind torch.autograd.graph.register_multi_grad_hook."""
    return bool(torch._C._will_engine_execute_node(node))


def reversible_run(blocks: list[ReversibleBlock], x: torch.Tensor) -> torch.Tensor:
    """Apply consecutive reversible blocks, keeping only the run's output."""
    run = _Run(blocks, x.device.type)
    anchor = torch.empty(0, device=x.device, requires_grad=True)
    y = ReversibleRunFunction.apply(x, run, anchor)
    if y.grad_fn is not None:  # the anchor's gradient accumulator: asked in backward whether it runs
        y.grad_fn.anchor_node = y.grad_fn.next_functions[-1][0]
    return y


class ReversibleStack(BlockStack):
    """A BlockStack whose reversible blocks store no activations (see the module docstring).

    Same iteration, length and parameter names as BlockStack (diagnostics, compile and checkpoints
    treat it alike). `store_activations = True` runs the same blocks with ordinary autograd: the
    baseline to compare memory, time and gradients against. A half-precision stream (bf16 / fp16
    autocast) is carried in float32 through each run, so the inverse subtracts what the forward
    added without rounding the sum to 8 bits of mantissa."""

    def __init__(self, blocks=None):
        super().__init__(blocks)
        # the reversible runs do not call BlockStack's per-block observer: without the attribute the depth
        # probe (deepres.observability.depth_probe) hooks each block instead, which the runs do call
        del self.observer
        self.store_activations = False

    def runs(self) -> list[list[nn.Module]]:
        """The blocks grouped: each maximal run of ReversibleBlocks, and every other block alone."""
        groups: list[list[nn.Module]] = []
        for block in self:
            if isinstance(block, ReversibleBlock) and groups and isinstance(groups[-1][-1], ReversibleBlock):
                groups[-1].append(block)
            else:
                groups.append([block])
        return groups

    def forward(self, x):
        if self.checkpoint_every:
            raise ConfigError("a reversible stack stores no activations inside its reversible runs, so activation "
                              "checkpointing has nothing to save there. Use one of the two, not both.")
        for group in self.runs():
            if not isinstance(group[0], ReversibleBlock):
                x = group[0](x)
                continue
            dtype = x.dtype
            if dtype in (torch.float16, torch.bfloat16):
                x = x.float()
            if self.store_activations or not torch.is_grad_enabled():
                x1, x2 = x.chunk(2, dim=1)
                for block in group:
                    x1, x2 = block((x1, x2))
                x = torch.cat([x1, x2], dim=1)
            else:
                x = reversible_run(group, x)
            x = x.to(dtype)
        return x

    @torch.no_grad()
    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The input that gives output `y`, for a stack made only of reversible blocks."""
        if not all(isinstance(b, ReversibleBlock) for b in self):
            raise ConfigError("only a stack of reversible blocks can be inverted; this one has blocks that change shape.")
        pair = y.chunk(2, dim=1)
        for block in reversed(self):
            pair = block.inverse(pair)
        return torch.cat(pair, dim=1)


def reversible_block(gate: str, make_body, make_gate, transform_bias: float, carry_bias: float) -> ReversibleBlock:
    """A ReversibleBlock of two couplings; `make_body()` builds one half's body, `make_gate(bias)` one
    half's gate (both map half the channels to half the channels)."""

    def coupling() -> Coupling:
        t = make_gate(transform_bias) if gate in ("highway", "gated") else None
        c = make_gate(carry_bias) if gate == "gated" else None
        return Coupling(make_body(), gate, t, c)

    return ReversibleBlock(coupling(), coupling())


__all__ = ["Coupling", "REVERSIBLE_GATES", "ReversibleBlock", "ReversibleRunFunction", "ReversibleStack",
           "check_reversible", "couple", "reversible_block", "reversible_run", "uncouple"]
