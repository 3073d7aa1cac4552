"""LSTMs as members of the residual family.

The cell state is a residual stream:  c_t = f_t ⊙ c_{t−1} + i_t ⊙ z_t  (carry f, transform i,
body z). The 1997 cell (Hochreiter & Schmidhuber) has no forget gate, f ≡ 1: a constant error
carousel whose carry weight is exactly 1.0. The 1999 cell (Gers et al.) learns f = σ(·) with its
bias initialised open (+1, Jozefowicz et al. 2015). A plain tanh RNN (no cell state) is the
baseline that fails at long lags.

`lstm` unfolds a stack of cells over time (BPTT; a depth-T residual net with shared weights);
`depth_lstm` unfolds LSTM steps over depth, the cell state carried from layer to layer.

Fast paths. A time loop of small ops is slow (one autograd node per op and step), so a layer runs
its whole sequence through PyTorch's recurrent kernels (`torch.lstm` / `torch.rnn_tanh`, the
functions behind torch.nn.LSTM / RNN: cuDNN on GPUs, PyTorch's own CPU implementation otherwise). The kernels take weights in torch.nn.LSTM's gate
order (i, f, g, o); `LSTMCell.fused_weights` builds them from the cell's own parameters on every
call, so parameter names, checkpoints and optimizer state are those of the reference loop. The 1997
cell has no forget-gate parameters: its rows are constant zeros with bias `PINNED_GATE_BIAS`, where
σ rounds to exactly 1.0 in float16, bfloat16, float32 and float64, so the carry stays exactly 1.0
and nothing trains it. The reference loop (`fused=False`) runs instead while a gate has a forward
hook (deepres.observability.diagnostics on its measured steps), so the gates are still read on those steps.

Memory over time (Gruslys et al. 2016, "Memory-Efficient Backpropagation Through Time"):
`time_checkpoint=k` keeps only the (h, c) state every k steps and recomputes the k steps in between
during backward; "sqrt" uses k ≈ √T, so stored activations grow as O(√T) instead of O(T).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepres.errors import ConfigError
from deepres.models.blocks import BlockStack, GateActivation
from deepres.models.registry import register_model

CellKind = Literal["1997", "1999", "rnn"]
CELLS = ("1997", "1999", "rnn")
# σ(64) = 1 / (1 + e^−64) rounds to exactly 1.0 in float16, bfloat16, float32 and float64 (e^−64 ≈ 1.6e-28
# is below half an ulp of 1.0 in each), and σ'(64) = σ(1 − σ) = 0: the pinned forget gate of the 1997 cell.
PINNED_GATE_BIAS = 64.0
TimeCheckpoint = int | Literal["sqrt"]


class LSTMCell(nn.Module):
    """One LSTM step. Gates are computed from [x, h] in one matmul; `input_proj` lets a caller
    precompute W_x·x for a whole sequence at once (the expensive part of a time loop)."""

    def __init__(self, input_size: int, hidden_size: int, forget_gate: bool = True, forget_bias: float = 1.0,
                 input_bias: float | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.has_forget_gate = forget_gate
        n = 4 if forget_gate else 3  # i, z, o (, f)
        self.input_proj = nn.Linear(input_size, n * hidden_size)
        self.recurrent_proj = nn.Linear(hidden_size, n * hidden_size, bias=False)
        self.input_gate = GateActivation()
        self.output_gate = GateActivation()
        self.forget_gate = GateActivation() if forget_gate else None
        if forget_gate:
            with torch.no_grad():
                self.input_proj.bias[3 * hidden_size :].fill_(forget_bias)
        if input_bias is not None:
            # A closed input gate at the start keeps the cell state from drifting into tanh's
            # saturation over long sequences (Hochreiter & Schmidhuber 1997, "internal state drift").
            with torch.no_grad():
                self.input_proj.bias[:hidden_size].fill_(input_bias)

    def step(self, xw: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xw: input_proj(x_t), (B, n·H); h, c: (B, H)."""
        pre = xw + self.recurrent_proj(h)
        i, z, o = self.input_gate(pre[:, : self.hidden_size]), torch.tanh(
            pre[:, self.hidden_size : 2 * self.hidden_size]
        ), self.output_gate(pre[:, 2 * self.hidden_size : 3 * self.hidden_size])
        if self.forget_gate is None:
            c = c + i * z  # 1997: carry weight exactly 1.0
        else:
            c = self.forget_gate(pre[:, 3 * self.hidden_size :]) * c + i * z
        return o * torch.tanh(c), c

    def fused_weights(self) -> list[torch.Tensor]:
        """[w_ih, w_hh, b_ih, b_hh] in torch.nn.LSTM's layout (gate order i, f, g, o), built from this
        cell's parameters (rows i, z, o, f); gradients flow back into them. The 1997 cell's forget rows
        are zeros with bias PINNED_GATE_BIAS: f = σ(0·x + 0·h + 64) = 1.0 exactly."""
        H = self.hidden_size
        W, U, b = self.input_proj.weight, self.recurrent_proj.weight, self.input_proj.bias
        i, z, o, f = (slice(k * H, (k + 1) * H) for k in range(4))
        if self.forget_gate is not None:
            w_ih, w_hh, b_ih = ([t[i], t[f], t[z], t[o]] for t in (W, U, b))
        else:
            w_ih = [W[i], W.new_zeros(H, W.shape[1]), W[z], W[o]]
            w_hh = [U[i], U.new_zeros(H, H), U[z], U[o]]
            b_ih = [b[i], b.new_full((H,), PINNED_GATE_BIAS), b[z], b[o]]
        return _flat_weights([w_ih, w_hh, b_ih, [b.new_zeros(4 * H)]])

    def fused_step(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`step(input_proj(x), h, c)` through torch's fused LSTM cell (one fused pointwise kernel on GPUs)."""
        return torch.lstm_cell(x, (h, c), *self.fused_weights())

    def gates_hooked(self) -> bool:
        """Whether outside code watches a gate (diagnostics): then only the reference step calls it."""
        return _hooked(self.input_gate, self.output_gate, self.forget_gate)


class RNNCell(nn.Module):
    """h_t = tanh(W x_t + U h_{t−1} + b): no carry path, the baseline of the 1997 paper."""

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.input_proj = nn.Linear(input_size, hidden_size)
        self.recurrent_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def step(self, xw: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(xw + self.recurrent_proj(h))
        return h, c

    def fused_weights(self) -> list[torch.Tensor]:
        """[w_ih, w_hh, b_ih, b_hh] in torch.nn.RNN's layout."""
        b = self.input_proj.bias
        return _flat_weights([[self.input_proj.weight], [self.recurrent_proj.weight], [b], [torch.zeros_like(b)]])

    def gates_hooked(self) -> bool:
        return False


def _flat_weights(params: list[list[torch.Tensor]], one_buffer: bool | None = None) -> list[torch.Tensor]:
    """Each list of row blocks stacked into one weight. On GPUs (`one_buffer`) all of them are views
    of one contiguous buffer in order: the layout cuDNN takes as it is (otherwise it copies the
    weights into one and warns). On CPUs that costs more than it saves (about 0.3 ms a call), so
    each weight is concatenated on its own there."""
    if not (params[0][0].is_cuda if one_buffer is None else one_buffer):
        return [blocks[0] if len(blocks) == 1 else torch.cat(blocks) for blocks in params]
    flat = torch.cat([t.reshape(-1) for blocks in params for t in blocks])
    sizes = [sum(t.numel() for t in blocks) for blocks in params]
    shapes = [(sum(t.shape[0] for t in blocks), *blocks[0].shape[1:]) for blocks in params]
    return [v.view(shape) for v, shape in zip(flat.split(sizes), shapes, strict=True)]


def _hooked(*modules: nn.Module | None) -> bool:
    return any(m is not None and (m._forward_hooks or m._forward_pre_hooks) for m in modules)


def make_cell(cell: str, input_size: int, hidden_size: int, forget_bias: float, input_bias: float | None = None) -> nn.Module:
    if cell not in CELLS:
        raise ConfigError(f"unknown cell {cell!r}. Valid cells: {', '.join(CELLS)} "
                          "('1997' = no forget gate, '1999' = forget gate, 'rnn' = plain tanh RNN).")
    if cell == "rnn":
        return RNNCell(input_size, hidden_size)
    return LSTMCell(input_size, hidden_size, forget_gate=cell == "1999", forget_bias=forget_bias, input_bias=input_bias)


def time_checkpoint_interval(seq_len: int, every: TimeCheckpoint) -> int:
    """k for `time_checkpoint`: 0 (off), an int >= 1, or "sqrt" (≈ √T, the minimum of T/k + k)."""
    if every == "sqrt":
        return max(1, round(math.sqrt(seq_len)))
    if isinstance(every, int) and not isinstance(every, bool) and every >= 0:
        return every
    raise ConfigError(f"time_checkpoint must be 0 (off), an integer k >= 1 (keep the state every k steps) "
                      f"or 'sqrt' (k ≈ √T); got {every!r}.")


class RecurrentLayer(nn.Module):
    """A cell unfolded over a whole sequence: (B, T, input) → (B, T, H), or (B, 1, H) (the last step)
    with `last_step_only`, which SequenceModel sets on its top layer: only h_T is read there, so the
    other T − 1 outputs need not be kept (with time checkpointing they are never stored at all).

    `fused`: run the sequence through torch's fused kernel (False: the reference loop over `cell.step`).
    `time_checkpoint`: keep the state only every k steps in forward, recompute in backward."""

    def __init__(self, cell: nn.Module, fused: bool = True, time_checkpoint: TimeCheckpoint = 0):
        super().__init__()
        self.cell = cell
        self.fused = fused
        time_checkpoint_interval(1, time_checkpoint)  # fail at build time, not at the first step
        self.time_checkpoint = time_checkpoint
        self.last_step_only = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        h = x.new_zeros(B, self.cell.hidden_size)
        c = torch.zeros_like(h)
        k = time_checkpoint_interval(T, self.time_checkpoint)
        # Decided once per forward and handed to the recomputation: diagnostics remove their gate
        # hooks before backward, and a recomputation on the other path would save other tensors.
        fused = self.fused and not self.cell.gates_hooked()
        if k <= 0 or k >= T or not torch.is_grad_enabled():
            y = self.unfold(x, h, c, fused)[0]
            return y[:, -1:].contiguous() if self.last_step_only else y
        out = []
        # split, not x[:, t0:t1]: a slice's backward zero-fills a whole (B, T, ·) gradient per segment
        segments = x.split(k, dim=1)
        for segment in segments[:-1]:
            if self.last_step_only:  # nothing but the state leaves the segment: O(√T) memory in all
                h, c = checkpoint(self._state_after, segment, h, c, fused, use_reentrant=False)
            else:
                y, h, c = checkpoint(self.unfold, segment, h, c, fused, use_reentrant=False)
                out.append(y)
        # The last segment is not checkpointed: backward needs its activations first.
        y, _, _ = self.unfold(segments[-1], h, c, fused)
        if self.last_step_only:
            return y[:, -1:].contiguous()
        out.append(y)
        return torch.cat(out, dim=1)

    def _state_after(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        _, h, c = self.unfold(x, h, c, fused)
        return h, c

    def unfold(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, fused: bool | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, input) from state (h, c), each (B, H) → outputs (B, T, H) and the final (h, c).
        `fused`: the kernel (True) or the reference loop; None: the kernel unless a gate is hooked."""
        if fused is None:
            fused = self.fused and not self.cell.gates_hooked()
        if fused:
            params = self.cell.fused_weights()
            train = self.training
            if isinstance(self.cell, RNNCell):  # (input, hx, params, has_biases, layers, dropout, train, bidir, batch_first)
                y, h_n = torch.rnn_tanh(x, h[None], params, True, 1, 0.0, train, False, True)
                return y, h_n[0], c
            y, h_n, c_n = torch.lstm(x, (h[None], c[None]), params, True, 1, 0.0, train, False, True)
            return y, h_n[0], c_n[0]
        xw = self.cell.input_proj(x)  # (B, T, n·H): all input projections in one matmul
        out = []
        # unbind, not xw[:, t]: indexing inside the loop makes autograd zero-fill a whole (B, T, n·H)
        # gradient at every step, O(T²) backward (12.5 s vs 1.05 s per step at T = 1000)
        for xw_t in xw.unbind(1):
            h, c = self.cell.step(xw_t, h, c)
            out.append(h)
        return torch.stack(out, dim=1), h, c


class SequenceModel(nn.Module):
    """Stacked recurrent layers over time; the prediction is read at the end of the sequence."""

    def __init__(self, blocks: BlockStack, head: nn.Module):
        super().__init__()
        self.blocks, self.head = blocks, head
        if isinstance(blocks[-1], RecurrentLayer):
            blocks[-1].last_step_only = True

    def entry(self, x: torch.Tensor) -> torch.Tensor:
        return x  # (B, T, input_size): the layers read the sequence as it is

    def exit(self, y: torch.Tensor) -> torch.Tensor:
        # contiguous(): a copy of the last step, so that the head does not keep a whole (B, T, F) output
        # alive for backward (its saved input would otherwise be a view of it: O(T) memory)
        return self.head(y[:, -1].contiguous())  # (B, T or 1, F) -> (B, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.exit(self.blocks(self.entry(x)))


@register_model
def lstm(
    input_size: int = 2,
    hidden_size: int = 64,
    output_size: int = 1,
    num_layers: int = 1,
    cell: CellKind = "1999",
    forget_bias: float = 1.0,
    input_bias: float | None = None,
    fused: bool = True,
    time_checkpoint: TimeCheckpoint = 0,
) -> SequenceModel:
    """LSTM unfolded over time (BPTT) for sequence regression/classification at the sequence end.

    Args:
        input_size: features per time step (adding problem: 2 = value, marker).
        output_size: 1 for regression, else number of classes.
        cell: "1997" (f ≡ 1), "1999" (forget gate, bias `forget_bias`), "rnn" (plain tanh RNN).
        input_bias: initial input-gate bias of the LSTM cells (None: PyTorch's default init, ≈ 0).
        fused: run each layer through torch's fused recurrent kernel (cuDNN on GPUs); False: the
            reference loop over time steps (same parameters, same results to float rounding).
        time_checkpoint: 0 (off), k (keep the state every k steps, recompute in backward) or "sqrt".
    """
    if num_layers < 1:
        raise ConfigError(f"lstm needs num_layers >= 1; got {num_layers}.")
    layers = [
        RecurrentLayer(make_cell(cell, input_size if i == 0 else hidden_size, hidden_size, forget_bias, input_bias),
                       fused=fused, time_checkpoint=time_checkpoint)
        for i in range(num_layers)
    ]
    return SequenceModel(BlockStack(layers), nn.Linear(hidden_size, output_size))


class DepthStep(nn.Module):
    """One LSTM step over depth: (u, h, c) → (u, h', c'), u the projected input fed to every step.

    On GPUs the step runs through torch's fused LSTM cell (one pointwise kernel instead of about ten);
    on CPUs that cell is no fused kernel and the weight reordering makes it slower (0.065 vs 0.049 s
    per training step, depth 100, width 64, batch 32, one thread), so the reference step runs there."""

    def __init__(self, cell: LSTMCell, fused: bool = True):
        super().__init__()
        self.cell = cell
        self.fused = fused
        self.fused_now = fused  # this forward's choice, set by DepthLSTM (kept for a recomputation)

    def forward(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        u, h, c = state
        if self.fused_now and u.is_cuda:
            h, c = self.cell.fused_step(u, h, c)
        else:
            h, c = self.cell.step(self.cell.input_proj(u), h, c)
        return u, h, c


class DepthLSTM(nn.Module):
    def __init__(self, stem: nn.Module, blocks: BlockStack, head: nn.Module):
        super().__init__()
        self.stem, self.blocks, self.head = stem, blocks, head

    def entry(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        u = self.stem(x.flatten(1))  # (B, H): the constant input of every step
        return u, torch.tanh(u), torch.zeros_like(u)  # (input, h0, c0)

    def exit(self, y: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.head(y[1])  # the last step's h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.stem(x.flatten(1))  # (B, H)
        h0 = torch.tanh(u)
        if self._one_fused_sequence():
            # One shared cell over a constant input is an LSTM over the sequence (u, u, …, u): one
            # fused kernel call for all steps.
            cell = self.blocks[0].cell
            seq = u[:, None].expand(-1, len(self.blocks), -1)
            _, h_n, _ = torch.lstm(seq, (h0[None], torch.zeros_like(h0)[None]), cell.fused_weights(), True, 1, 0.0,
                                   self.training, False, True)
            return self.head(h_n[0])
        # Decided in this forward, not in each step: activation checkpointing recomputes the
        # steps in backward, after diagnostics removed their gate hooks, and must take the same path.
        for step in self.blocks:
            step.fused_now = step.fused and not step.cell.gates_hooked()
        _, h, _ = self.blocks((u, h0, torch.zeros_like(u)))
        return self.head(h)

    def _one_fused_sequence(self) -> bool:
        """Shared weights, fused steps, and no outside code on the steps (hooks, checkpointing)."""
        steps = list(self.blocks)
        cell = steps[0].cell
        return (all(s.cell is cell and s.fused for s in steps) and self.blocks.checkpoint_every == 0
                and not _hooked(self.blocks, *steps) and not cell.gates_hooked())


@register_model
def depth_lstm(
    depth: int = 100,
    width: int = 64,
    cell: Literal["1997", "1999"] = "1999",
    forget_bias: float = 1.0,
    share_weights: bool = False,
    in_features: int = 784,
    num_classes: int = 10,
    fused: bool = True,
) -> DepthLSTM:
    """Feed-forward classifier of `depth` LSTM steps over depth: the cell state is the residual
    stream from layer to layer. `share_weights=True` uses one cell for every step (an LSTM
    unfolded over a constant input: one fused kernel call for all steps). `fused=False`: the
    reference step everywhere."""
    if depth < 1:
        raise ConfigError(f"depth_lstm needs depth >= 1; got depth={depth}.")
    if cell not in ("1997", "1999"):
        raise ConfigError(f"depth_lstm cell must be '1997' or '1999'; got {cell!r}.")

    def new_cell() -> LSTMCell:
        return LSTMCell(width, width, forget_gate=cell == "1999", forget_bias=forget_bias)

    shared = new_cell() if share_weights else None
    steps = [DepthStep(shared or new_cell(), fused) for _ in range(depth)]
    return DepthLSTM(nn.Linear(in_features, width), BlockStack(steps), nn.Linear(width, num_classes))
