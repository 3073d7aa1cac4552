"""LSTMs as members of the residual family.

The cell state is a residual stream:  c_t = f_t ⊙ c_{t−1} + i_t ⊙ z_t  (carry f, transform i,
body z). The 1997 cell (Hochreiter & Schmidhuber) has no forget gate, f ≡ 1: a constant error
carousel whose carry weight is exactly 1.0. The 1999 cell (Gers et al.) learns f = σ(·) with its
bias initialised open (+1, Jozefowicz et al. 2015). A plain tanh RNN (no cell state) is the
baseline that fails at long lags.

`lstm` unfolds a stack of cells over time (BPTT; a depth-T residual net with shared weights);
`depth_lstm` unfolds LSTM steps over depth, the cell state carried from layer to layer.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from deepres.errors import ConfigError
from deepres.models.blocks import BlockStack, GateActivation
from deepres.models.registry import register_model

CellKind = Literal["1997", "1999", "rnn"]
CELLS = ("1997", "1999", "rnn")


class LSTMCell(nn.Module):
    """One LSTM step. Gates are computed from [x, h] in one matmul; `input_proj` lets a caller
    precompute W_x·x for a whole sequence at once (the expensive part of a time loop)."""

    def __init__(self, input_size: int, hidden_size: int, forget_gate: bool = True, forget_bias: float = 1.0):
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


def make_cell(cell: str, input_size: int, hidden_size: int, forget_bias: float) -> nn.Module:
    if cell not in CELLS:
        raise ConfigError(f"unknown cell {cell!r}. Valid cells: {', '.join(CELLS)} "
                          "('1997' = no forget gate, '1999' = forget gate, 'rnn' = plain tanh RNN).")
    if cell == "rnn":
        return RNNCell(input_size, hidden_size)
    return LSTMCell(input_size, hidden_size, forget_gate=cell == "1999", forget_bias=forget_bias)


class RecurrentLayer(nn.Module):
    """A cell unfolded over a whole sequence: (B, T, input) → (B, T, H)."""

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        xw = self.cell.input_proj(x)  # (B, T, n·H): all input projections in one matmul
        h = x.new_zeros(B, self.cell.hidden_size)
        c = torch.zeros_like(h)
        out = []
        # unbind, not xw[:, t]: indexing inside the loop makes autograd zero-fill a whole (B, T, n·H)
        # gradient at every step, O(T²) backward (12.5 s vs 1.05 s per step at T = 1000)
        for xw_t in xw.unbind(1):
            h, c = self.cell.step(xw_t, h, c)
            out.append(h)
        return torch.stack(out, dim=1)


class SequenceModel(nn.Module):
    """Stacked recurrent layers over time; the prediction is read at the end of the sequence."""

    def __init__(self, blocks: BlockStack, head: nn.Module):
        super().__init__()
        self.blocks, self.head = blocks, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x)[:, -1])  # (B, T, F) -> (B, output_size)


@register_model
def lstm(
    input_size: int = 2,
    hidden_size: int = 64,
    output_size: int = 1,
    num_layers: int = 1,
    cell: CellKind = "1999",
    forget_bias: float = 1.0,
) -> SequenceModel:
    """LSTM unfolded over time (BPTT) for sequence regression/classification at the sequence end.

    Args:
        input_size: features per time step (adding problem: 2 = value, marker).
        output_size: 1 for regression, else number of classes.
        cell: "1997" (f ≡ 1), "1999" (forget gate, bias `forget_bias`), "rnn" (plain tanh RNN).
    """
    if num_layers < 1:
        raise ConfigError(f"lstm needs num_layers >= 1; got {num_layers}.")
    layers = [
        RecurrentLayer(make_cell(cell, input_size if i == 0 else hidden_size, hidden_size, forget_bias))
        for i in range(num_layers)
    ]
    return SequenceModel(BlockStack(layers), nn.Linear(hidden_size, output_size))


class DepthStep(nn.Module):
    """One LSTM step over depth: (u, h, c) → (u, h', c'), u the projected input fed to every step."""

    def __init__(self, cell: LSTMCell):
        super().__init__()
        self.cell = cell

    def forward(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        u, h, c = state
        h, c = self.cell.step(self.cell.input_proj(u), h, c)
        return u, h, c


class DepthLSTM(nn.Module):
    def __init__(self, stem: nn.Module, blocks: BlockStack, head: nn.Module):
        super().__init__()
        self.stem, self.blocks, self.head = stem, blocks, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.stem(x.flatten(1))  # (B, H)
        _, h, _ = self.blocks((u, torch.tanh(u), torch.zeros_like(u)))
        return self.head(h)


@register_model
def depth_lstm(
    depth: int = 100,
    width: int = 64,
    cell: Literal["1997", "1999"] = "1999",
    forget_bias: float = 1.0,
    share_weights: bool = False,
    in_features: int = 784,
    num_classes: int = 10,
) -> DepthLSTM:
    """Feed-forward classifier of `depth` LSTM steps over depth: the cell state is the residual
    stream from layer to layer. `share_weights=True` uses one cell for every step (an LSTM
    unfolded over a constant input)."""
    if depth < 1:
        raise ConfigError(f"depth_lstm needs depth >= 1; got depth={depth}.")
    if cell not in ("1997", "1999"):
        raise ConfigError(f"depth_lstm cell must be '1997' or '1999'; got {cell!r}.")

    def new_cell() -> LSTMCell:
        return LSTMCell(width, width, forget_gate=cell == "1999", forget_bias=forget_bias)

    shared = new_cell() if share_weights else None
    steps = [DepthStep(shared or new_cell()) for _ in range(depth)]
    return DepthLSTM(nn.Linear(in_features, width), BlockStack(steps), nn.Linear(width, num_classes))
