"""Error flow through depth: ‖∂L/∂x₀‖ ÷ ‖∂L/∂x_L‖ for x₀ the input of the first block and x_L the
output of the last one (docs/science.md#measuring-error-flow). 1.0 means the error reaches the bottom of the stack undiminished."""

from __future__ import annotations

import torch
from torch import nn


def error_flow_ratio(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> float:
    """One forward/backward with a cross-entropy loss (random targets if none given)."""
    captured: dict[str, torch.Tensor] = {}

    def keep_input(_m, args):
        x0 = args[0]
        x0 = x0[1] if isinstance(x0, tuple) else x0  # depth-LSTM carries (u, h, c): h
        x0.retain_grad()
        captured["in"] = x0

    def keep_output(_m, _args, out):
        xl = out[1] if isinstance(out, tuple) else out
        xl.retain_grad()
        captured["out"] = xl

    blocks = model.blocks
    hooks = [blocks.register_forward_pre_hook(keep_input), blocks.register_forward_hook(keep_output)]
    try:
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)  # makes the stem's output a non-leaf we can hook
            logits = model(x)
            if target is None:
                g = torch.Generator().manual_seed(0)
                target = torch.randint(0, logits.shape[-1], (logits.shape[0],), generator=g)
            nn.functional.cross_entropy(logits, target).backward()
    finally:
        for h in hooks:
            h.remove()
    return float(captured["in"].grad.norm() / captured["out"].grad.norm())
