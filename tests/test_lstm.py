"""The LSTM fast paths against the reference loop, time checkpointing, and the 1997 cell's exact carry."""

from __future__ import annotations

import math

import pytest
import torch

from deepres.data.sequence import adding_sequence
from deepres.errors import ConfigError
from deepres.models import create_model
from deepres.models.lstm import PINNED_GATE_BIAS, LSTMCell

CELLS = ["1997", "1999", "rnn"]


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    for block in model.blocks:
        block.fused = fused


def loss_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    out = model(x)
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


def assert_same(a, b, atol=1e-5):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=1e-5)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(ga, gb, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_fused_lstm_equals_the_reference_loop(cell):
    torch.manual_seed(0)
    model = create_model("lstm", cell=cell, hidden_size=16, num_layers=2, output_size=3, forget_bias=1.5)
    x = torch.randn(5, 60, 2)
    set_fused(model, False)
    reference = loss_and_grads(model, x)
    set_fused(model, True)
    fused = loss_and_grads(model, x)
    assert_same(fused, reference)
    assert all(g.abs().sum() > 0 for g in fused[1])  # every parameter gets a gradient through the kernel


@pytest.mark.parametrize("cell", ["1997", "1999"])
def test_fused_depth_lstm_equals_the_reference_step(cell):
    torch.manual_seed(0)
    for share in (True, False):
        model = create_model("depth_lstm", depth=12, width=8, in_features=10, cell=cell, share_weights=share)
        x = torch.randn(4, 10)
        set_fused(model, False)
        reference = loss_and_grads(model, x)
        set_fused(model, True)
        assert model._one_fused_sequence() == share
        assert_same(loss_and_grads(model, x), reference)
    # the fused cell of torch (used on GPUs) against the reference step
    c = LSTMCell(8, 8, forget_gate=cell == "1999")
    u, h, s = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    for a, b in zip(c.fused_step(u, h, s), c.step(c.input_proj(u), h, s), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("fused", [True, False])
def test_time_checkpointing_changes_nothing_but_memory(cell, fused):
    torch.manual_seed(0)
    model = create_model("lstm", cell=cell, hidden_size=8, num_layers=2, fused=fused)
    x = torch.randn(3, 50, 2)
    plain = loss_and_grads(model, x)
    for every in (7, "sqrt", 50):  # 50 = T: one segment, nothing to checkpoint
        for block in model.blocks:
            block.time_checkpoint = every
        assert_same(loss_and_grads(model, x), plain, atol=1e-6)


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward after a forward pass (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("fused", [True, False])
def test_time_checkpointing_keeps_a_square_root_of_the_activations(fused):
    torch.manual_seed(0)
    x = torch.randn(4, 2500, 2)
    kept = {}
    for every in (0, "sqrt"):
        model = create_model("lstm", cell="1997", hidden_size=16, time_checkpoint=every, fused=fused)
        kept[every] = saved_bytes(model, x)
    # without: several (B, H) tensors per step, O(T); with √T = 50: 50 segment states and one live
    # segment of 50 steps, O(√T)
    assert kept["sqrt"] < 0.1 * kept[0], kept


def test_bad_time_checkpoint_is_a_config_error():
    with pytest.raises(ConfigError, match="time_checkpoint must be 0"):
        create_model("lstm", time_checkpoint="all")
    with pytest.raises(ConfigError, match="time_checkpoint must be 0"):
        create_model("lstm", time_checkpoint=-1)


def test_pinned_forget_gate_is_exactly_open_in_every_float_type():
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        assert torch.sigmoid(torch.tensor(PINNED_GATE_BIAS, dtype=dtype)).item() == 1.0, dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_1997_carry_is_exactly_one_after_training(dtype):
    """Train the 1997 cell through the fused kernel, then close its input gate: whatever training did,
    the cell state must come out of T fused steps bit for bit as it went in (f = 1.0, i = 0)."""
    torch.manual_seed(0)
    model = create_model("lstm", cell="1997", hidden_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = map(torch.stack, zip(*[adding_sequence(30, g) for _ in range(8)], strict=True))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    layer = model.blocks[0]
    # no forget-gate parameter exists that training could have moved
    assert [n for n, _ in layer.named_parameters()] == [
        "cell.input_proj.weight", "cell.input_proj.bias", "cell.recurrent_proj.weight"]
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.cell.input_proj.bias[:8] = -1e4  # i = σ(−1e4) = 0 exactly
        c0 = torch.randn(8, 8, dtype=dtype)
        x = x.to(dtype)
        _, _, c_T = layer.unfold(x, torch.randn(8, 8, dtype=dtype), c0)
    assert torch.equal(c_T, c0)


def test_parameter_names_and_old_checkpoints_load():
    torch.manual_seed(0)
    reference = create_model("lstm", cell="1999", hidden_size=8, num_layers=2, fused=False)
    fused = create_model("lstm", cell="1999", hidden_size=8, num_layers=2)
    # the names every checkpoint written before the fast path has (no new parameters or buffers)
    names = [f"blocks.{i}.cell.{p}" for i in range(2) for p in ("input_proj.weight", "input_proj.bias",
                                                                 "recurrent_proj.weight")]
    assert list(fused.state_dict()) == [*names, "head.weight", "head.bias"]
    fused.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(3, 20, 2)
    torch.testing.assert_close(fused(x), reference(x), atol=1e-6, rtol=1e-5)


def test_hooked_gates_run_the_reference_loop():
    """Diagnostics hook the gates on their measured step: the gates must then be called every step."""
    model = create_model("lstm", cell="1999", hidden_size=8)
    gate = model.blocks[0].cell.forget_gate
    calls = []
    handle = gate.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(2, 25, 2))
    handle.remove()
    assert len(calls) == 25
    model(torch.randn(2, 25, 2))
    assert len(calls) == 25  # unhooked: the fused kernel, the gate module is not called


def test_adding_sequence_zeroes_a_marked_first_value():
    """The paper: when the first pair is marked, X1 is set to zero, so the target is the plain sum."""
    g = torch.Generator().manual_seed(1)
    hits = 0
    for _ in range(300):
        x, y = adding_sequence(50, g)
        marked = x[:, 1] == 1
        torch.testing.assert_close(y, 0.5 + x[marked, 0].sum(0, keepdim=True) / 4)
        if marked[0]:
            hits += 1
            assert x[0, 0] == 0
    assert hits > 10  # the first of ten positions is marked in about 10 % of sequences


def test_gpu_weight_layout_is_one_buffer_with_the_same_values():
    """On GPUs the fused weights are views of one contiguous buffer (cuDNN's layout); same values."""
    from deepres.models.lstm import _flat_weights

    W, U, b = torch.randn(12, 3), torch.randn(12, 4), torch.randn(12)
    params = [[W[:4], W[4:]], [U[:4], U[4:]], [b], [torch.zeros(12)]]
    separate, flat = _flat_weights(params, one_buffer=False), _flat_weights(params, one_buffer=True)
    for a, c in zip(separate, flat, strict=True):
        assert torch.equal(a, c)
    ptrs = [t.data_ptr() for t in flat]
    assert len({t.untyped_storage().data_ptr() for t in flat}) == 1
    assert all(p1 == p0 + t.numel() * 4 for p0, p1, t in zip(ptrs, ptrs[1:], flat, strict=False))


@pytest.mark.parametrize("cell", ["1997", "1999"])
def test_time_checkpointing_on_a_measured_step(tmp_path, cell):
    """Diagnostics hook the gates for one forward and unhook them before backward: the
    recomputation in backward must take the forward's path (the reference loop) again."""
    from test_diagnostics import depth_records, fit, loader  # the diagnostics tests' small training loop

    from deepres.observability.diagnostics import DepthDiagnostics

    torch.manual_seed(0)
    net = create_model("lstm", cell=cell, hidden_size=8, output_size=10, time_checkpoint=4)
    fit(tmp_path, net, [DepthDiagnostics(every_n_steps=2)], steps=3, data=loader(shape=(12, 2)))
    records = depth_records(tmp_path)
    assert [r["step"] for r in records] == [0, 2] and len(records[0]["gate/transform"]) == 1


def test_activation_checkpointed_depth_lstm_on_a_measured_step(tmp_path):
    from test_diagnostics import depth_records, fit, loader

    from deepres.observability.diagnostics import DepthDiagnostics
    from deepres.parallelize.activation_checkpoint import apply_activation_checkpointing

    torch.manual_seed(0)
    net = create_model("depth_lstm", depth=6, width=8, in_features=64)
    apply_activation_checkpointing(net, every=2)
    fit(tmp_path, net, [DepthDiagnostics(every_n_steps=2)], steps=3, data=loader())
    assert len(depth_records(tmp_path)[0]["gate/carry"]) == 6


def test_input_bias_auto_closes_the_input_gates_by_ln_T():
    from deepres.training import SequenceModule

    module = SequenceModule(cell="1997", hidden_size=4, input_bias="auto", input_shape=(1000, 2))
    bias = module.net.blocks[0].cell.input_proj.bias
    torch.testing.assert_close(bias[:4], torch.full((4,), -math.log(1000)))
    assert not torch.allclose(bias[4:], bias[:4].mean())  # only the input gate's rows
    assert torch.sigmoid(bias[0]).item() * 1000 == pytest.approx(1.0, rel=2e-3)  # σ(−ln T)·T ≈ one input over T steps
    with pytest.raises(ConfigError, match="model.input_bias='closed'"):
        SequenceModule(input_bias="closed")
