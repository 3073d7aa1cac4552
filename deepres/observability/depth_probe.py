"""What one measured step of `deepres.observability.diagnostics.DepthDiagnostics` records, block by block.

`Probe` wraps the block stack's forward for that one step (no hook on any block: a 10,000-block net
would otherwise pay 20,000 Python hook calls) and hooks only the gates, whose values live inside
the blocks. Values stay on the device as 0-d tensors until `collect`, which moves them to the CPU
in one transfer.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from deepres.models.blocks import Gate, GateActivation
from deepres.models.hyper import HyperBlock, composite_gain, start_recording, stop_recording

# Module attribute name -> the role of that gate in y = g(x)·x + t(x)·h(x)
# (docs/science.md#one-family-of-blocks). A `Gate` is hooked itself rather than its `act` (σ): a
# pinned gate skips σ and must still report its value.
GATE_ROLES = {
    "transform_gate": "transform",
    "input_gate": "transform",  # LSTM: c_t = f ⊙ c_{t−1} + i ⊙ z_t
    "carry_gate": "carry",
    "forget_gate": "carry",
}


def find_gates(blocks: nn.Module) -> list[tuple[str, nn.Module]]:
    """(role, module) for every distinct gate inside `blocks`, found by attribute name."""
    found: dict[int, tuple[str, nn.Module]] = {}
    for name, module in blocks.named_modules(remove_duplicate=False):
        role = GATE_ROLES.get(name.rsplit(".", 1)[-1])
        if role is not None and isinstance(module, (Gate, GateActivation)):
            found.setdefault(id(module), (role, module))
    return list(found.values())


def block_key(index: int, num_blocks: int) -> str:
    """`block_017`: zero-padded to at least 3 digits so keys sort in block order."""
    return f"block_{index:0{max(3, len(str(num_blocks - 1)))}d}"


def spread(num_blocks: int, count: int) -> list[int]:
    """At most `count` evenly spaced block indices, always with the first and the last."""
    if count < 0 or count >= num_blocks:
        return list(range(num_blocks))
    if count == 0:
        return []
    if count == 1:
        return [num_blocks - 1]
    return sorted({round(i * (num_blocks - 1) / (count - 1)) for i in range(count)})


def _stream(x: Any) -> Any:
    """The residual stream of a block's input or output; a depth-LSTM carries (u, h, c): h."""
    return x[1] if isinstance(x, tuple) else x


# ----------------------------------------------------------------------------------------------
# One sampled step
# ----------------------------------------------------------------------------------------------
def is_compiled(module: nn.Module) -> bool:
    """Whether any part of `module` runs through torch.compile (wrapped, or `Module.compile()` in place)."""
    return any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None)
               for m in module.modules())


class Probe:
    """What one sampled step records: the stack's input and output (two hooks on the stack), every
    block's output norm (the stack's `observer`, one call per block) and every gate's mean openness
    (a hook per gate). A gate's values belong to the block that finishes next.

    A compiled model runs this one forward eagerly: compiled code does not call hooks added to
    submodules after compilation (dynamo does not guard on them), so gates would go unmeasured."""

    def __init__(self, blocks: nn.Module, gates: list[tuple[str, nn.Module]], eager: bool = False):
        self.stance = torch.compiler.set_stance("force_eager") if eager else None  # torch >= 2.6
        self.blocks = blocks
        self.num_blocks = len(blocks)
        self.values: dict[str, list[torch.Tensor]] = {"act_rms": []}
        self.owners: dict[str, list[int]] = {"act_rms": []}
        self.numel: list[int] = []  # elements of each observed output, for RMS = ‖y‖ / √numel
        self.x_in: torch.Tensor | None = None
        self.x_out: torch.Tensor | None = None
        self.handles = [blocks.register_forward_pre_hook(self._keep_input),
                        blocks.register_forward_hook(self._keep_output)]
        self.gate_keys: list[str] = []
        for role, module in gates:
            key = f"gate/{role}"
            if key not in self.values:
                self.values[key], self.owners[key] = [], []
                self.gate_keys.append(key)
            self.handles.append(module.register_forward_hook(self._record_gate(key)))
        # multi-stream blocks (deepres.models.hyper) hand over their H^res: the composite gain of ∏H^res
        self.hyper_index = [i for i, block in enumerate(blocks) if isinstance(block, HyperBlock)]
        # a list, not a context manager held open: a net copied while probed (copy.deepcopy) must stay copyable
        self.mixing_matrices = start_recording(blocks)
        self._recording = True
        self.composite: dict[str, float] = {}
        self.observed = hasattr(blocks, "observer")
        if self.observed:
            blocks.observer = self._observe
        else:  # a plain ModuleList-like stack: hooks on each block instead
            self.handles += [block.register_forward_hook(self._block_hook(i)) for i, block in enumerate(blocks)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self._recording:
            stop_recording(self.blocks)
            self._recording = False
        if self.observed:
            self.blocks.observer = None
            self.observed = False
        if self.stance is not None:
            self.stance.__exit__(None, None, None)  # back to the stance before this step
            self.stance = None

    def _block_hook(self, index: int):
        def hook(_module, _args, out):
            self._observe(index, out)
        return hook

    def _observe(self, index: int | None, out) -> None:
        if index is None:  # a forward that must not count (a pipeline's metadata inference): drop its gate values
            for key in self.gate_keys:
                del self.values[key][len(self.owners[key]):]
            return
        y = _stream(out)
        if isinstance(y, torch.Tensor):
            self.values["act_rms"].append(torch.linalg.vector_norm(y.detach(), dtype=torch.float32))
            self.owners["act_rms"].append(index)
            self.numel.append(y.numel())
        for key in self.gate_keys:  # the gate values recorded since the last block are this block's
            owners = self.owners[key]
            owners.extend([index] * (len(self.values[key]) - len(owners)))

    def _record_gate(self, key: str):
        values = self.values[key]

        def hook(_module, _args, out):
            values.append(torch.mean(out.detach(), dtype=torch.float32))
        return hook

    def _keep_input(self, _module, args):
        x0 = args[0]
        if isinstance(x0, torch.Tensor) and not x0.requires_grad:
            # Raw data enters the stack directly (an LSTM over time): make it a leaf that gets a .grad.
            x0 = x0.detach().requires_grad_(True)
            self.x_in = x0
            return (x0, *args[1:])
        stream = _stream(x0)
        if isinstance(stream, torch.Tensor) and stream.requires_grad:
            stream.retain_grad()
            self.x_in = stream
        return None

    def _keep_output(self, _module, _args, out) -> None:
        stream = _stream(out)
        if isinstance(stream, torch.Tensor) and stream.requires_grad:
            stream.retain_grad()
            self.x_out = stream

    def collect(self) -> dict[str, np.ndarray]:
        """Per-block means over every call of this step (LSTMs call a gate once per time step)."""
        arrays = {}
        for key, values in self.values.items():
            values = values[: len(self.owners[key])]  # values after the last block (none) have no owner
            if not values:
                continue
            device = values[0].device
            stacked = torch.stack(values)
            if key == "act_rms":  # mean of squares per block from the norms: ‖y‖² / numel
                stacked = stacked.square() / torch.tensor(self.numel, device=device, dtype=torch.float32)
            owners = torch.tensor(self.owners[key], device=device)
            sums = torch.zeros(self.num_blocks, device=device).index_add_(0, owners, stacked)
            counts = torch.bincount(owners, minlength=self.num_blocks).float()
            means = (sums / counts).cpu().numpy()  # 0/0 = NaN for a block without that gate
            arrays[key] = np.sqrt(means) if key == "act_rms" else means
        if self.mixing_matrices and len(self.mixing_matrices) == len(self.hyper_index):  # each block once
            gain = composite_gain(self.mixing_matrices)
            for key, values in (("max_row_sum", gain.block_max_row_sum), ("max_col_sum", gain.block_max_col_sum),
                                ("max_abs_log_col_sum", gain.block_max_abs_log_col_sum)):
                per_block = np.full(self.num_blocks, np.nan)  # NaN: a block without stream mixing (a transition)
                per_block[self.hyper_index] = values
                arrays[f"hyper/{key}"] = per_block
            self.composite = {f"hyper/{k}": v for k, v in gain.summary().items() if k.startswith("composite/")}
        return arrays

    def boundary_grad_squares(self) -> tuple[float, float]:
        """‖∂L/∂x₀‖² and ‖∂L/∂x_L‖² (NaN when not measured): the error-flow ratio's two ends, to add over ranks."""
        if self.x_in is None or self.x_out is None or self.x_in.grad is None or self.x_out.grad is None:
            return math.nan, math.nan
        return float(self.x_in.grad.float().square().sum()), float(self.x_out.grad.float().square().sum())

    def error_flow_ratio(self) -> float:
        if self.x_in is None or self.x_out is None or self.x_in.grad is None or self.x_out.grad is None:
            return math.nan
        return float(self.x_in.grad.norm() / self.x_out.grad.norm())
