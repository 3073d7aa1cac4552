"""Multi-stream residuals: Hyper-Connections, mHC and mHC-lite (docs/science.md#multi-stream-residuals).

A residual block keeps one stream x and computes y = g(x)·x + t(x)·h(x). These members keep n streams
H = (H_1 … H_n) and give each block three small mixings of them:

    x_in  = Σ_j H^pre_j · H_j                 what the body reads (a weighted sum of the streams)
    H'_i  = Σ_j H^res_ij · H_j + H^post_i · h(x_in)

    gate      H^pre            H^post            H^res                                  paper
    hc        a_m              b                 A_r (unconstrained)                     Zhu et al. 2025
    mhc       σ(·)             2σ(·)             Sinkhorn–Knopp(exp(·)), doubly stoch.   Xie et al. 2025
    mhc_lite  σ(·)             2σ(·)             Σ_k softmax(·)_k P_k over the n! permutation matrices
                                                                                         Yang & Gao 2026

Static mixings are learned constants; dynamic ones add a term computed from the streams themselves,
scaled by a small learned factor (0.01 at init), through a projection that starts at zero, so every
member starts as its static form. The stem copies its output into the n streams (`StreamExpand`) and
the head averages them (`StreamMean`), so a model's `.blocks` stay a `BlockStack` of blocks that map
(B, C, …, n) to (B, C, …, n): checkpointing, pipeline stages and the depth probe see one tensor. In
memory the blocks lay that tensor out stream by stream, (B, n, C, …), where their arithmetic takes the
fewest operations (deepres.models.stream_mixing_ops says why).

With n = 1 every member is a member of y = g(x)·x + t(x)·h(x): H^res is a 1×1 carry weight (exactly 1
for mhc and mhc_lite, the only 1×1 doubly stochastic matrix), H^post the transform weight and H^pre a
scale on the body's input (tests/test_hyper.py shows each against `gated` with pinned gates).

`composite_gain` measures ∏H^res over the stack, the quantity the doubly stochastic constraint keeps
bounded: its largest absolute row and column sums (the forward and backward gain of the mapping the
streams go through from the first block to the last) and its largest |log column sum| (a column summing
to 0.4 attenuates as much as one summing to 2.5 amplifies, and a max-sum hides it).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepres.errors import ConfigError
from deepres.models.stream_mixing_ops import (
    full_precision,
    mhc_read,
    sinkhorn_exp,
    sinkhorn_exp_backward,
    stream_read,
    stream_write,
)

HYPER_GATES: tuple[str, ...] = ("hc", "mhc", "mhc_lite")
DEFAULT_STREAMS = 4  # n = 4: the expansion rate all three papers train with
SINKHORN_ITERS = 20  # t_max of mHC
DYNAMIC_SCALE = 0.01  # the learned factor on the dynamic term at init (HC's s_α, s_β; mHC's α)
# H^res of mhc and mhc_lite at init: (1 − ε)·I + ε·J/n, each stream mostly carried on by itself (as
# HC's A_r = I) with a little of every other, so the logits are finite and the mixing learns
INITIAL_MIXING = 0.1
MAX_LITE_STREAMS = 6  # mhc_lite mixes n! permutation matrices: 720 at n = 6


def check_hyper(gate: str, streams: int | None, sinkhorn_iters: int, *, reversible: bool = False,
                init: str = "default", dynamic: bool = True) -> int:
    """Refuse what a multi-stream member cannot honour; return the number of streams."""
    if gate not in HYPER_GATES:
        for name, value, unset in (("streams", streams, (None, 1)), ("dynamic", dynamic, (True,)),
                                   ("sinkhorn_iters", sinkhorn_iters, (SINKHORN_ITERS,))):
            if value not in unset:
                raise ConfigError(f"{name}={value} is an option of the multi-stream gates ({', '.join(HYPER_GATES)}); "
                                  f"gate={gate!r} keeps one stream. Fix: set gate to one of them, or drop {name}.")
        return 1
    n = DEFAULT_STREAMS if streams is None else int(streams)
    if n < 1:
        raise ConfigError(f"streams must be >= 1 (the residual streams of gate={gate!r}); got {streams}.")
    if gate == "mhc_lite" and n > MAX_LITE_STREAMS:
        raise ConfigError(f"gate='mhc_lite' mixes all n! permutation matrices ({math.factorial(n):,} at "
                          f"streams={n}); use streams <= {MAX_LITE_STREAMS}, or gate='mhc'.")
    if int(sinkhorn_iters) < 1:
        raise ConfigError(f"sinkhorn_iters must be >= 1 (mHC uses {SINKHORN_ITERS}); got {sinkhorn_iters}.")
    if not isinstance(dynamic, bool):
        raise ConfigError(f"dynamic must be true or false; got {dynamic!r}.")
    if reversible:
        raise ConfigError(
            f"reversible blocks need an exactly invertible stream mixing (a permutation), and gate={gate!r} "
            "mixes the streams with a matrix that is not one (hc: unconstrained; mhc and mhc_lite: a doubly "
            "stochastic matrix, singular for instance at J/n). Fix: reversible=false, or gate='highway'/"
            "'gated'/'residual' for reversible blocks.")
    if init != "default":
        raise ConfigError(f"init={init!r} is a preset of the one-stream members; gate={gate!r} brings the "
                          "initialisation of its paper. Fix: init='default'.")
    return n


# ----------------------------------------------------------------------------------------------
# Doubly stochastic matrices
# ----------------------------------------------------------------------------------------------
def sinkhorn(logits: torch.Tensor, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """Sinkhorn–Knopp on exp(logits) over the last two dimensions: rows, then columns, normalised to
    sum 1, `iters` times each (Sinkhorn & Knopp 1967; mHC's t_max = 20).

    Computed in the log domain, where normalising the rows of exp(L) is one op, exp(log_softmax(L)),
    that cannot overflow. The columns are normalised last, so they sum to 1 to rounding and the rows
    to within what `iters` iterations leave; the mean over the streams, which the head reads, is then
    carried through every block unchanged. The gradient is that of the `iters` iterations (not of the
    limit), computed by `_Sinkhorn` without an autograd graph of 2·iters nodes per block. On a CPU both
    directions are one call each of deepres's compiled kernel (deepres/models/csrc/sinkhorn.cpp: the same
    iterations on exp(L − max L), the log domain for matrices spanning more than 25 nats)."""
    # (…, n, n) → (n, n, …): the normalised dimensions outermost and the batch contiguous innermost,
    # where PyTorch's CPU log_softmax runs 5 times faster on 4 × 4 matrices than over the last dimensions
    moved = logits.movedim((-2, -1), (0, 1)).contiguous()
    if not torch.is_grad_enabled() or not logits.requires_grad:
        out = sinkhorn_exp(moved, iters)
    else:
        out = _Sinkhorn.apply(moved, iters)
    return out.movedim((0, 1), (-2, -1)).contiguous()


class _Sinkhorn(torch.autograd.Function):
    """The iterations run without autograd and backward recomputes them (`sinkhorn_backward`): on a CPU
    core a third of the time autograd's 80-node graph takes per block."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int) -> torch.Tensor:
        ctx.save_for_backward(logits)
        ctx.iters = iters
        return sinkhorn_exp(logits, iters)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (logits,) = ctx.saved_tensors
        return sinkhorn_exp_backward(grad, logits, ctx.iters), None


def permutation_matrices(n: int) -> torch.Tensor:
    """All n! permutation matrices as an (n!, n, n) tensor, the identity first."""
    perms = list(itertools.permutations(range(n)))
    mats = torch.zeros(len(perms), n, n)
    for k, perm in enumerate(perms):
        mats[k, torch.arange(n), torch.tensor(perm)] = 1.0
    return mats


def permutation_mixture(logits: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """Σ_k softmax(logits)_k P_k: a convex combination of permutation matrices, doubly stochastic
    exactly (Birkhoff–von Neumann), with one softmax and one matmul."""
    n = perms.shape[-1]
    return (logits.softmax(-1) @ perms.flatten(1)).unflatten(-1, (n, n))


# ----------------------------------------------------------------------------------------------
# The mixings of one block
# ----------------------------------------------------------------------------------------------
class StreamMixing(nn.Module):
    """H^pre (n), H^post (n) and H^res (n × n) of one block, static or dynamic.

    Static: learned constants, returned without a batch dimension. Dynamic: per sample, the static
    value plus a term computed from the streams (images: from their spatial means). hc follows Zhu et
    al. (each stream's layer-normed value through a shared projection, tanh, times s_α or s_β); mhc and
    mhc_lite follow Xie et al. (the RMS-normalised concatenation of all streams through one projection,
    times α, added to the logits before σ, 2σ and the projection onto doubly stochastic matrices).

    Initialisation: H^post = 2σ(post_logit) on every stream; post_logit = 0 gives the papers' H^post = 1,
    the models' default is the depth-aware −ln(L) − 1 of Highway transform gates (H^post ≈ 2/(e·L), so
    the L blocks together start by adding about one body's output; with H^post = 1 the default job's SGD
    diverges from 100 blocks on, as the plain residual member does). hc otherwise as its paper (H^pre =
    e_(k mod n) for block k, H^res = I); mhc and mhc_lite as HC's through their maps: H^pre = 0.9 on
    stream k mod n and 0.1 on the others, H^res = (1 − ε)·I + ε·J/n with ε = INITIAL_MIXING. The dynamic projections start at zero and their factors at 0.01."""

    def __init__(self, kind: str, streams: int, features: int, index: int = 0, *, dynamic: bool = True,
                 sinkhorn_iters: int = SINKHORN_ITERS, post_logit: float = 0.0):
        super().__init__()
        if kind not in HYPER_GATES:
            raise ConfigError(f"unknown stream mixing {kind!r}. Valid: {', '.join(HYPER_GATES)}.")
        n = streams
        self.kind, self.streams, self.dynamic, self.sinkhorn_iters = kind, n, dynamic, int(sinkhorn_iters)
        if kind == "hc":
            self.pre_bias = nn.Parameter(torch.zeros(n).index_fill_(0, torch.tensor(index % n), 1.0))
            self.post_bias = nn.Parameter(torch.full((n,), 2.0 / (1.0 + math.exp(-post_logit))))
            self.res_bias = nn.Parameter(torch.eye(n))
        else:
            # σ(±ln 9) = 0.9 / 0.1: block k reads mostly stream k mod n, as HC's e_(k mod n). Reading every
            # stream alike would keep the n copies the stem makes identical for good: with equal H^pre and
            # H^post every stream gets the same gradient, so nothing ever tells them apart
            self.pre_bias = nn.Parameter(torch.full((n,), -math.log(9.0)).index_fill_(0, torch.tensor(index % n),
                                                                                       math.log(9.0)))
            self.post_bias = nn.Parameter(torch.full((n,), float(post_logit)))
            target = (1.0 - INITIAL_MIXING) * torch.eye(n) + INITIAL_MIXING / n
            if kind == "mhc":  # already doubly stochastic: Sinkhorn returns it
                self.res_bias = nn.Parameter(target.log())
            else:
                weights = torch.full((math.factorial(n),), INITIAL_MIXING / math.factorial(n))
                weights[0] += 1.0 - INITIAL_MIXING  # the identity: Σ_k w_k P_k = target
                self.res_bias = nn.Parameter(weights.log())
                self.register_buffer("perms", permutation_matrices(n), persistent=False)
        if dynamic:
            res_terms = self.res_bias.numel()
            if kind == "hc":  # per stream j: its H^pre_j, H^post_j and the n entries A_r[j, :] = H^res[:, j]
                self.norm = nn.LayerNorm(features, elementwise_affine=False)
                self.proj = nn.Linear(features, 2 + n, bias=False)
            else:
                self.proj = nn.Linear(n * features, 2 * n + res_terms, bias=False)
            nn.init.zeros_(self.proj.weight)
            self.scale = nn.Parameter(torch.full((3,), DYNAMIC_SCALE))  # on the pre, post and res terms
            # which factor scales each column of the projection
            index = [0, 1] + [2] * n if kind == "hc" else [0] * n + [1] * n + [2] * res_terms
            self.register_buffer("scale_index", torch.tensor(index), persistent=False)

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, streams={self.streams}, dynamic={self.dynamic}"
                + (f", sinkhorn_iters={self.sinkhorn_iters}" if self.kind == "mhc" else ""))

    def forward(self, streams: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(H^pre, H^post, H^res) for the streams (B, C, …, n): shapes (n,), (n,), (n, n) when static,
        (B, n), (B, n), (B, n, n) when dynamic."""
        n = self.streams
        if not self.dynamic:
            pre, post, res = self.pre_bias, self.post_bias, self.res_bias
            if self.kind == "hc":
                return pre, post, res
            pre, post = torch.sigmoid(pre), 2.0 * torch.sigmoid(post)
        elif streams is None:
            raise ValueError("a dynamic stream mixing needs the streams")
        elif self.kind == "hc":
            d = torch.tanh(self.proj(self.norm(_summary(streams))))  # (B, n, 2 + n), row j from stream j
            scaled = d * self.scale[self.scale_index]
            pre = self.pre_bias + scaled[..., 0]
            post = self.post_bias + scaled[..., 1]
            res = self.res_bias + scaled[..., 2:].transpose(1, 2)
            return pre, post, res
        else:
            flat = _summary(streams).flatten(1)  # (B, n·C), stream by stream as the blocks lay them out
            # the projection's columns are vec(H) of (C, n): the same order as the input's, permuted
            weight = self.proj.weight.unflatten(1, (-1, n)).transpose(1, 2).flatten(1)
            # mHC's RMSNorm(vec(H))·φ with the norm's division applied to the 2n + n² outputs instead of
            # the n·C inputs (their Eq. 15, the same value): one fused norm instead of RMSNorm's five ops
            rms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True) * flat.shape[-1] ** -0.5
            d = nn.functional.linear(flat, weight) / (rms + 1e-6)
            bias = torch.cat([self.pre_bias, self.post_bias, self.res_bias.flatten()])
            z = torch.addcmul(bias, d, self.scale[self.scale_index])
            gates = torch.sigmoid(z[:, : 2 * n])
            pre, post = gates[:, :n], 2.0 * gates[:, n:]
            res = z[:, 2 * n:].unflatten(-1, self.res_bias.shape)
        if self.kind == "mhc":
            return pre, post, sinkhorn(res, self.sinkhorn_iters)
        return pre, post, permutation_mixture(res, self.perms)

    def read(self, by_stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """mhc, dynamic: the body's input x, the mixed streams, H^post and H^res (no gradient) for the
        streams laid out (B, n, C, …), computed as `forward` and `stream_read` do, in one autograd node."""
        return mhc_read(by_stream.flatten(2), _summary_of(by_stream), self.proj.weight, self.pre_bias, self.post_bias,
                        self.res_bias, self.scale, self.scale_index, self.sinkhorn_iters)


def _summary(streams: torch.Tensor) -> torch.Tensor:
    """(B, C, …, n) → (B, n, C): each stream, and of images each stream's spatial mean."""
    return _summary_of(streams.movedim(-1, 1))


def _summary_of(by_stream: torch.Tensor) -> torch.Tensor:
    """`_summary` of streams laid out (B, n, C, …)."""
    return by_stream if by_stream.ndim == 3 else by_stream.flatten(3).mean(-1)


class StreamExpand(nn.Module):
    """(B, C, …) → (B, C, …, n): n copies of the stem's output, one per stream (as Zhu et al.).

    The streams are the last dimension: mixing them is then one matmul with an n × n matrix over
    contiguous memory, and reading one weighted sum of them hands the body a contiguous (B, C, …)."""

    def __init__(self, streams: int):
        super().__init__()
        self.streams = streams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1).expand(*x.shape, self.streams)

    def extra_repr(self) -> str:
        return f"streams={self.streams}"


class StreamMean(nn.Module):
    """(B, C, …, n) → (B, C, …): the mean of the streams, what the head reads.

    Zhu et al. sum the streams and normalise the sum (their head starts with a norm); deepres's dense
    head has none, and the sum would scale every block's share of the output by Σ_i H^post_i = n·H^post,
    the body's gradient by n and the step it takes by n². The mean is the sum up to that norm's scale."""

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return streams.mean(-1)


class PerStream(nn.Module):
    """Applies a one-stream module (a stage transition) to every stream alike: (B, …, n) → (B, …', n)."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        n = streams.shape[-1]
        y = self.module(streams.movedim(-1, 1).flatten(0, 1))
        return y.unflatten(0, (streams.shape[0], n)).movedim(1, -1)


class HyperBlock(nn.Module):
    """One block on n streams: the body reads Σ_j H^pre_j H_j, and H'_i = Σ_j H^res_ij H_j + H^post_i h.

    The streams are (B, C, …, n). With `drop_rate` (stochastic depth) a dropped sample takes the stream
    mixing alone, H' = H^res H."""

    # fixed multiplier m on the block's change, H' = H + m·(H^res H + H^post h − H) (deepres.models.depth_scaling):
    # the mixing the streams go through is then (1 − m)·I + m·H^res; 1: off
    depth_multiplier = 1.0

    def __init__(self, body: nn.Module, mixing: StreamMixing, drop_rate: float = 0.0):
        super().__init__()
        self.body = body
        self.mixing = mixing
        self.drop_rate = float(drop_rate)
        # a list while `recording_mixing` is on: every forward appends its H^res (detached)
        self.recorded: list[torch.Tensor] | None = None

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        # The streams and their mixing stay in float32 under bf16/fp16 autocast (the body still runs in
        # half precision): a bf16 H^res has column sums off by ~1e-3, which compound over the blocks as
        # (1 − 1e-3)^L, the very drift the doubly stochastic constraint is there to prevent.
        if streams.dtype in (torch.float16, torch.bfloat16):
            streams = streams.float()
        # (B, n, C, …): contiguous as the previous block wrote it; the stem's expanded copies and streams
        # laid out otherwise are copied once, as batched matmuls take a slow path on any other layout
        by_stream = streams.movedim(-1, 1).contiguous()
        with full_precision(streams.device.type):
            if self.mixing.kind == "mhc" and self.mixing.dynamic:
                x, mixed, post, res = self.mixing.read(by_stream)
            else:
                pre, post, res = self.mixing(streams)
                x, mixed = stream_read(pre, res, by_stream.flatten(2))
            if self.recorded is not None:
                self.recorded.append(self.effective_mixing(res.detach()))
        h = self.body(x.view(by_stream.shape[:1] + by_stream.shape[2:]))
        if self.drop_rate > 0.0 and self.training:
            h = h * _keep_mask(h, self.drop_rate)
        with full_precision(streams.device.type):
            out = stream_write(mixed, post, h.to(mixed.dtype))
            if self.depth_multiplier != 1.0:
                out = torch.lerp(by_stream.flatten(2), out, self.depth_multiplier)
        return out.view(by_stream.shape).movedim(1, -1)

    def effective_mixing(self, res: torch.Tensor) -> torch.Tensor:
        """The matrix the streams go through, (1 − m)·I + m·H^res, for H^res (…, n, n): H^res itself without a
        depth multiplier."""
        if self.depth_multiplier == 1.0:
            return res
        eye = torch.eye(res.shape[-1], dtype=res.dtype, device=res.device)
        return torch.lerp(eye, res, self.depth_multiplier)

    def extra_repr(self) -> str:
        parts = [f"drop_rate={self.drop_rate:.4g}"] if self.drop_rate else []
        if self.depth_multiplier != 1.0:
            parts.append(f"depth_multiplier={self.depth_multiplier:.4g}")
        return ", ".join(parts)


def _keep_mask(h: torch.Tensor, rate: float) -> torch.Tensor:
    """Per-sample keep mask scaled by 1/(1 − p), as ResidualBlock's."""
    survival = 1.0 - rate
    shape = (h.shape[0],) + (1,) * (h.ndim - 1)
    return torch.empty(shape, dtype=h.dtype, device=h.device).bernoulli_(survival).div_(survival)


def hyper_blocks(blocks: nn.Module) -> list[HyperBlock]:
    """The HyperBlocks of a block stack (its direct members: no walk through 10,000 blocks' submodules
    on every sampled step of the depth probe), or anywhere inside another module."""
    members = blocks if isinstance(blocks, nn.ModuleList) else blocks.modules()
    return [m for m in members if isinstance(m, HyperBlock)]


def start_recording(blocks: nn.Module) -> list[torch.Tensor]:
    """From now on every HyperBlock's forward appends its H^res (detached) to the returned list, in order of
    execution, until `stop_recording(blocks)`. Activation-checkpoint recomputation runs under backward: stop
    before it."""
    recorded: list[torch.Tensor] = []
    for block in hyper_blocks(blocks):
        block.recorded = recorded
    return recorded


def stop_recording(blocks: nn.Module) -> None:
    for block in hyper_blocks(blocks):
        block.recorded = None


@contextlib.contextmanager
def recording_mixing(blocks: nn.Module) -> Iterator[list[torch.Tensor]]:
    """`start_recording` … `stop_recording` as a context."""
    recorded = start_recording(blocks)
    try:
        yield recorded
    finally:
        stop_recording(blocks)


def residual_matrices(blocks: nn.Module, streams: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Every HyperBlock's H^res in stack order: from the parameters alone when all mixings are static,
    else from one forward of `streams` (B, C, …, n) through `blocks` without gradients."""
    found = hyper_blocks(blocks)
    if all(not b.mixing.dynamic for b in found):
        with torch.no_grad():
            return [b.effective_mixing(b.mixing()[2]) for b in found]
    if streams is None:
        raise ValueError("dynamic stream mixings depend on the input: pass the streams entering the blocks")
    with torch.no_grad(), recording_mixing(blocks) as recorded:
        blocks(streams)
    return recorded


# ----------------------------------------------------------------------------------------------
# The composite gain of ∏H^res
# ----------------------------------------------------------------------------------------------
@dataclass
class CompositeGain:
    """Per-block and composite gains of the stream mixings H^res_1 … H^res_L (worst sample of a batch).

    `composite_*` describe P = H^res_L ⋯ H^res_1: the largest absolute row sum (forward gain on the
    streams), the largest absolute column sum (backward gain), the smallest column sum and the largest
    |log column sum| (attenuation and amplification alike; inf for a column summing to ≤ 0)."""

    block_max_row_sum: np.ndarray
    block_max_col_sum: np.ndarray
    block_max_abs_log_col_sum: np.ndarray
    composite_max_row_sum: float
    composite_max_col_sum: float
    composite_min_col_sum: float
    composite_max_abs_log_col_sum: float

    def summary(self) -> dict[str, float]:
        """Scalars for a logger: the composite's four numbers and the worst block's."""
        return {
            "composite/max_row_sum": self.composite_max_row_sum,
            "composite/max_col_sum": self.composite_max_col_sum,
            "composite/min_col_sum": self.composite_min_col_sum,
            "composite/max_abs_log_col_sum": self.composite_max_abs_log_col_sum,
            "block/max_row_sum": float(self.block_max_row_sum.max()),
            "block/max_col_sum": float(self.block_max_col_sum.max()),
            "block/max_abs_log_col_sum": float(self.block_max_abs_log_col_sum.max()),
        }


def _abs_log(sums: torch.Tensor) -> torch.Tensor:
    return torch.where(sums > 0, sums.clamp_min(1e-300).log().abs(), torch.full_like(sums, math.inf))


def matrix_product(mats: torch.Tensor) -> torch.Tensor:
    """mats[L−1] @ … @ mats[0] for mats (L, …, n, n), by pairwise products: log2(L) batched matmuls."""
    while mats.shape[0] > 1:
        odd = mats[-1:] if mats.shape[0] % 2 else None
        paired = mats[1::2] @ mats[0:mats.shape[0] - (odd is not None):2]
        mats = paired if odd is None else torch.cat([paired, odd])
    return mats[0]


def composite_gain(matrices: Sequence[torch.Tensor], samples: int | None = 16) -> CompositeGain:
    """The gains of the H^res of every block (each (n, n), or (B, n, n) per sample), in float64, over
    the first `samples` samples of a batch (None: all).

    Costs L small matrices' row and column sums and log2(L) batched matmuls of n × n matrices: at
    10,000 blocks and n = 4 on one CPU core about 0.06 s for static mixings and 0.5 s for 16 samples of
    dynamic ones (a training step of that net takes tens of seconds)."""
    if not matrices:
        raise ValueError("composite_gain needs at least one matrix")
    if samples is not None:
        matrices = [m[:samples] if m.ndim == 3 else m for m in matrices]
    batch = max((m.shape[0] for m in matrices if m.ndim == 3), default=1)
    if any(m.shape != matrices[0].shape for m in matrices):  # static (n, n) among per-sample (B, n, n)
        matrices = [m.expand(batch, *m.shape[-2:]) for m in matrices]
    with torch.no_grad():
        mats = torch.stack(list(matrices)).to("cpu", torch.float64)  # (L, [B,] n, n)
    if mats.ndim == 3:
        mats = mats.unsqueeze(1)
    rows, cols = mats.abs().sum(-1), mats.abs().sum(-2)
    prod = matrix_product(mats)
    p_cols = prod.sum(-2)
    return CompositeGain(
        block_max_row_sum=rows.amax((1, 2)).numpy(),
        block_max_col_sum=cols.amax((1, 2)).numpy(),
        block_max_abs_log_col_sum=_abs_log(mats.sum(-2)).amax((1, 2)).numpy(),
        composite_max_row_sum=float(prod.abs().sum(-1).max()),
        composite_max_col_sum=float(prod.abs().sum(-2).max()),
        composite_min_col_sum=float(p_cols.min()),
        composite_max_abs_log_col_sum=float(_abs_log(p_cols).max()),
    )


__all__ = [
    "DEFAULT_STREAMS", "HYPER_GATES", "SINKHORN_ITERS", "CompositeGain", "HyperBlock", "PerStream", "StreamExpand",
    "StreamMixing", "StreamMean", "check_hyper", "composite_gain", "hyper_blocks", "matrix_product",
    "permutation_matrices", "permutation_mixture", "recording_mixing", "residual_matrices", "sinkhorn",
]
