"""The arithmetic of a multi-stream block (deepres.models.hyper) in as few ops as possible.

A multi-stream block does little arithmetic (n × n matrices and n·C-wide vectors) spread over many
small ops, and on a CPU core each op and each autograd node costs microseconds whatever its size: at
the default width a block's time is mostly that fixed cost. So the streams enter a block's arithmetic
laid out (B, n, D), one contiguous row of D = C·… values per stream, and

- reading the body's input Σ_j H^pre_j H_j and mixing the streams Σ_j H^res_ij H_j is ONE batched
  matmul of the (n + 1) × n matrix [H^pre; H^res] with them (`stream_read`), whose backward is two;
- writing the block's output H^res H + H^post ⊗ h is one addcmul, and it leaves the streams in that
  same layout for the next block: the tensor the blocks hand on is (B, C, …, n) by shape and index
  (what pipeline stages, checkpoints and the diagnostics see) with the streams outermost in memory.

The numbers are those of the plain formulas up to float rounding (tests/test_hyper.py compares the
gradients with a float64 reference and with finite differences).
"""

from __future__ import annotations

import contextlib

import torch

from deepres.models import cpu_kernels


class _StreamRead(torch.autograd.Function):
    """(pre (…, n), res (…, n, n), streams (B, n, D)) → (x (B, D), mixed (B, n, D)); static mixings
    come without the batch dimension."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, res: torch.Tensor, streams: torch.Tensor):
        read = torch.cat([pre.unsqueeze(-2), res], -2)  # (…, n + 1, n): row 0 reads, rows 1… mix
        out = torch.matmul(read, streams)  # (B, n + 1, D)
        ctx.save_for_backward(read, streams)
        return out[:, 0].contiguous(), out[:, 1:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x: torch.Tensor, grad_mixed: torch.Tensor):
        read, streams = ctx.saved_tensors
        grad_out = torch.cat([grad_x.unsqueeze(1), grad_mixed], 1)  # (B, n + 1, D)
        grad_streams = torch.matmul(read.transpose(-1, -2), grad_out) if ctx.needs_input_grad[2] else None
        grad_pre = grad_res = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_read = torch.matmul(grad_out, streams.transpose(-1, -2))  # (B, n + 1, n)
            if read.ndim == 2:  # one matrix for every sample
                grad_read = grad_read.sum(0)
            grad_pre, grad_res = grad_read[..., 0, :], grad_read[..., 1:, :]
        return grad_pre, grad_res, grad_streams


def stream_read(pre: torch.Tensor, res: torch.Tensor, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x = Σ_j pre_j·streams_j (B, D) and mixed_i = Σ_j res_ij·streams_j (B, n, D) for streams (B, n, D),
    with pre (n,) and res (n, n), or per sample (B, n) and (B, n, n)."""
    return _StreamRead.apply(pre, res, streams)


def stream_write(mixed: torch.Tensor, post: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """mixed_i + post_i·h for mixed (B, n, D), post (n,) or (B, n) and the body's output h (B, D)."""
    return torch.addcmul(mixed, post.unsqueeze(-1), h.flatten(1).unsqueeze(1))


def full_precision(device_type: str):
    """Autocast off, entered only where it is on: entering and leaving an autocast context costs
    more than a small block's op."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Sinkhorn–Knopp in the log domain, on matrices laid out (n rows, n columns, …)
# ----------------------------------------------------------------------------------------------
def sinkhorn_log(log_m: torch.Tensor, iters: int, steps: list[torch.Tensor] | None = None) -> torch.Tensor:
    """`iters` times: normalise the rows (sum over the column index), then the columns, of exp(log_m).
    With the normalised dimensions outermost and the batch contiguous innermost, PyTorch's CPU
    log_softmax runs 5 times faster on 4 × 4 matrices than over the last dimensions."""
    for _ in range(iters):
        for dim in (1, 0):
            log_m = torch._log_softmax(log_m, dim, False)
            if steps is not None:
                steps.append(log_m)
    return log_m


def sinkhorn_backward(grad: torch.Tensor, logits: torch.Tensor, iters: int) -> torch.Tensor:
    """The gradient of exp(sinkhorn_log(logits, iters)) with respect to the logits: the iterations are
    recomputed (memory: the logits alone per block, which matters at 10,000 blocks) and each
    log_softmax's backward applied in reverse."""
    steps: list[torch.Tensor] = []
    out = sinkhorn_log(logits, iters, steps).exp()
    g = grad * out  # through exp
    for k in range(len(steps) - 1, -1, -1):
        g = torch._log_softmax_backward_data(g, steps[k], 0 if k % 2 else 1, logits.dtype)
    return g


def _kernel_for(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and cpu_kernels.available()


def sinkhorn_exp(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """exp(sinkhorn_log(logits, iters)) for logits (n, n, …): on a CPU one call of deepres's compiled
    kernel (deepres.models.cpu_kernels) instead of 2·iters ops, where it is built."""
    if _kernel_for(logits):
        return torch.ops.deepres.sinkhorn_forward(logits, iters)
    return sinkhorn_log(logits, iters).exp()


def sinkhorn_exp_backward(grad: torch.Tensor, logits: torch.Tensor, iters: int) -> torch.Tensor:
    """`sinkhorn_backward`, on a CPU one call of the compiled kernel where it is built."""
    if _kernel_for(logits):
        return torch.ops.deepres.sinkhorn_backward(grad.contiguous(), logits, iters)
    return sinkhorn_backward(grad, logits, iters)


# ----------------------------------------------------------------------------------------------
# mHC's dynamic mixing and the read of the streams, fused
# ----------------------------------------------------------------------------------------------
class _MhcRead(torch.autograd.Function):
    """Xie et al.'s dynamic mixings and the block's read in one autograd node:

        z     = bias + scale ⊙ (φ · vec(S)) / (RMS(vec(S)) + 1e-6)      S: the streams' summary (B, n, C)
        H^pre = σ(z_pre),  H^post = 2σ(z_post),  H^res = Sinkhorn(z_res)
        x     = Σ_j H^pre_j H_j,  mixed_i = Σ_j H^res_ij H_j                 H: the streams (B, n, D)

    The backward is written out op by op: autograd's version of these few lines is dozens of nodes per
    block, each a fixed cost that a narrow block's arithmetic does not hide."""

    @staticmethod
    def forward(ctx, streams, summary, weight, pre_bias, post_bias, res_bias, scale, scale_index, iters):
        n = pre_bias.shape[0]
        batch = streams.shape[0]
        flat = summary.reshape(batch, -1)
        norm = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
        inv = 1.0 / (norm * flat.shape[-1] ** -0.5 + 1e-6)
        # φ's columns are vec of the (C, n) summary; the streams come as (n, C)
        weight = weight.unflatten(1, (-1, n)).transpose(1, 2).reshape(weight.shape[0], -1)
        projected = torch.mm(flat, weight.t())  # (B, 2n + n²)
        per_column = scale[scale_index]
        z = torch.addcmul(torch.cat([pre_bias, post_bias, res_bias.flatten()]), projected * inv, per_column)
        gates = torch.sigmoid(z[:, : 2 * n])
        logits = z[:, 2 * n:].t().reshape(n, n, batch).contiguous()  # (n, n, B)
        res = sinkhorn_exp(logits, iters)
        # (B, n + 1, n), contiguous: MKL's batched matmul takes a slow path, 15 times slower, on any other layout
        read = torch.cat([gates[:, :n].t().unsqueeze(0), res], 0).permute(2, 0, 1).contiguous()
        out = torch.bmm(read, streams)
        ctx.save_for_backward(streams, flat, weight, norm, inv, projected, per_column, gates, logits, res, read,
                              scale_index)
        ctx.iters, ctx.scale_shape = iters, scale.shape
        res_per_sample = res.permute(2, 0, 1)
        ctx.mark_non_differentiable(res_per_sample)
        return out[:, 0].contiguous(), out[:, 1:], 2.0 * gates[:, n:], res_per_sample

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x, grad_mixed, grad_post, _grad_res):
        streams, flat, weight, norm, inv, projected, per_column, gates, logits, res, read, scale_index = ctx.saved_tensors
        n, batch = logits.shape[0], logits.shape[-1]
        grad_out = torch.cat([grad_x.unsqueeze(1), grad_mixed], 1)  # (B, n + 1, D)
        grad_streams = torch.bmm(read.transpose(1, 2), grad_out)
        grad_read = torch.bmm(grad_out, streams.transpose(1, 2))  # (B, n + 1, n)
        grad_res = grad_read[:, 1:].permute(1, 2, 0).contiguous()  # (n, n, B)
        grad_logits = sinkhorn_exp_backward(grad_res, logits, ctx.iters)
        grad_gates = torch.ops.aten.sigmoid_backward(torch.cat([grad_read[:, 0], 2.0 * grad_post], 1), gates)
        grad_z = torch.cat([grad_gates, grad_logits.reshape(n * n, batch).t()], 1)  # (B, 2n + n²)
        grad_bias = grad_z.sum(0)
        scaled = grad_z * per_column  # d/d(projected · inv)
        grad_scale = grad_z.new_zeros(ctx.scale_shape).index_add_(
            0, scale_index, (grad_z * projected * inv).sum(0))
        grad_projected = scaled * inv
        grad_weight = torch.mm(grad_projected.t(), flat).unflatten(1, (n, -1)).transpose(1, 2).flatten(1)
        # inv = 1 / (‖flat‖·N^-1/2 + ε): d inv / d flat = −inv²·N^-1/2·flat / ‖flat‖
        grad_inv = (scaled * projected).sum(-1, keepdim=True)
        radial = -grad_inv * inv * inv * flat.shape[-1] ** -0.5 / norm.clamp_min(torch.finfo(norm.dtype).tiny)
        grad_flat = torch.addmm(radial * flat, grad_projected, weight)
        return (grad_streams, grad_flat.view(batch, n, -1), grad_weight, grad_bias[:n], grad_bias[n: 2 * n],
                grad_bias[2 * n:].view(n, n), grad_scale, None, None)


def mhc_read(streams: torch.Tensor, summary: torch.Tensor, weight: torch.Tensor, pre_bias: torch.Tensor,
             post_bias: torch.Tensor, res_bias: torch.Tensor, scale: torch.Tensor, scale_index: torch.Tensor,
             iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (B, D), mixed (B, n, D), H^post (B, n), H^res (B, n, n), the last without gradient) of
    mHC's dynamic mixing for the streams (B, n, D) and their summary (B, n, C)."""
    return _MhcRead.apply(streams, summary, weight, pre_bias, post_bias, res_bias, scale, scale_index, iters)
