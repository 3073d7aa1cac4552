"""Error flow through depth: ‖∂L/∂x₀‖ ÷ ‖∂L/∂x_L‖ for x₀ the input of the first block and x_L the
output of the last one (docs/science.md#measuring-error-flow). 1.0 means the error reaches the bottom of the stack undiminished."""

from __future__ import annotations

import torch
from torch import nn


def error_flow_ratio(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> float:
    """One forward/backward with a cross-entropy loss (random targets if none given).

    Where the head passes no error at all (Fixup's zero-initialised classifier: ∂L/∂x_L = 0), the
    ratio is that of the stack alone: a random unit error is injected at x_L, ‖Jᵀe‖ ÷ ‖e‖."""
    captured: dict[str, torch.Tensor] = {}

    def keep_input(_m, args):
        x0 = args[0]
        captured["in"] = x0[1] if isinstance(x0, tuple) else x0  # depth-LSTM carries (u, h, c): h

    def keep_output(_m, _args, out):
        captured["out"] = out[1] if isinstance(out, tuple) else out

    blocks = model.blocks
    hooks = [blocks.register_forward_pre_hook(keep_input), blocks.register_forward_hook(keep_output)]
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # makes the stem's output a non-leaf we can hook
            logits = model(x)
            if target is None:
                g = torch.Generator().manual_seed(0)
                target = torch.randint(0, logits.shape[-1], (logits.shape[0],), generator=g)
            loss = nn.functional.cross_entropy(logits, target)
            x0, xl = captured["in"], captured["out"]
            g0, gl = torch.autograd.grad(loss, [x0, xl], retain_graph=True, allow_unused=True)
            if g0 is None:  # the stack's input does not reach the loss at all
                return 0.0
            if float(gl.norm()) == 0.0:
                gen = torch.Generator().manual_seed(0)
                e = torch.randn(xl.shape, generator=gen, dtype=xl.dtype).to(xl.device)
                (g0,) = torch.autograd.grad(xl, x0, e / e.norm(), allow_unused=True)
                return 0.0 if g0 is None else float(g0.norm())
    finally:
        for h in hooks:
            h.remove()
    return float(g0.norm() / gl.norm())
