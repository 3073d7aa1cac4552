"""The gate's σ and mix as one autograd op (docs/science.md#the-fused-gate).

Highway:  y = s + σ(a)·(h − s)        Gated:  y = σ(a_c)·s + σ(a_t)·h

with a the gate's pre-activation, s the carried input and h the body's output. As separate autograd
ops this is σ, subtract, multiply, add forward and about six elementwise passes backward, each over
a full-resolution map, with autograd keeping σ's output and both factors of the product. Here the
forward is σ + one subtract + one fused multiply-add (`addcmul`), the backward four passes written
out by hand, and only σ(a) and h − s are kept.

On CUDA the same function is a candidate for torch.compile (one Triton kernel each way); the eager
form here is what deepres runs by default on every device.
"""

from __future__ import annotations

import torch


class HighwayMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: torch.Tensor, a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        t = torch.sigmoid(a)
        d = h - s
        ctx.save_for_backward(t, d)
        ctx.s_shape, ctx.h_shape = s.shape, h.shape
        return torch.addcmul(s, t, d)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        t, d = ctx.saved_tensors
        dh = g * t
        ds = g - dh
        da = torch.ops.aten.sigmoid_backward(g * d, t)
        return _sum_to(ds, ctx.s_shape), _sum_to(da, t.shape), _sum_to(dh, ctx.h_shape)


class GatedMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: torch.Tensor, a_c: torch.Tensor, a_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        c, t = torch.sigmoid(a_c), torch.sigmoid(a_t)
        ctx.save_for_backward(s, c, t, h)
        return torch.addcmul(c * s, t, h)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        s, c, t, h = ctx.saved_tensors
        ds = g * c
        dh = g * t
        da_c = torch.ops.aten.sigmoid_backward(g * s, c)
        da_t = torch.ops.aten.sigmoid_backward(g * h, t)
        return _sum_to(ds, s.shape), _sum_to(da_c, c.shape), _sum_to(da_t, t.shape), _sum_to(dh, h.shape)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return grad if grad.shape == shape else grad.sum_to_size(shape)


def highway_mix(s: torch.Tensor, a: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return HighwayMix.apply(s, a, h)


def gated_mix(s: torch.Tensor, a_c: torch.Tensor, a_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return GatedMix.apply(s, a_c, a_t, h)
