"""The model zoo: every registered model, parameter counts, the gate family, init and error flow."""

import logging
import math

import pytest
import torch
import torchvision

from deepres.errors import ConfigError
from deepres.models import create_model, list_models
from deepres.models.blocks import Gate
from deepres.models.error_flow import error_flow_ratio

# Tiny overrides per model so that all of them build and run in seconds.
IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet200", "imagenet_resnet"]


def tiny(name: str) -> dict:
    if name in IMAGENET:
        return {"layers": [1, 1, 1, 1], "num_classes": 5}
    if name.startswith("preact_resnet"):
        return {"depth": 11, "num_classes": 5}
    if name == "cifar_resnet" or (name.endswith("_cifar") and "resnet" in name):
        return {"depth": 8, "num_classes": 5}
    if name == "highway_cnn_cifar":
        return {"widths": [8, 16], "blocks_per_stage": [1, 2], "num_classes": 5}
    if name == "highway_mlp":
        return {"depth": 4, "width": 8, "in_features": 16, "num_classes": 5}
    if name == "depth_lstm":
        return {"depth": 4, "width": 8, "in_features": 16, "num_classes": 5}
    if name == "lstm":
        return {"hidden_size": 8, "output_size": 5}
    if name == "plain_mlp":
        return {"widths": [8, 6, 4], "in_features": 16, "num_classes": 5}
    raise AssertionError(f"add tiny settings for new model {name!r}")


def example_input(name: str) -> torch.Tensor:
    if name in ("highway_mlp", "depth_lstm", "plain_mlp"):
        return torch.randn(3, 16)
    if name == "lstm":
        return torch.randn(3, 6, 2)
    return torch.randn(3, 3, 32, 32)


def forward_backward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    out.square().mean().backward()
    return out


@pytest.mark.parametrize("name", list_models())
def test_every_model_trains_a_step(name):
    torch.manual_seed(0)
    model = create_model(name, **tiny(name))
    assert len(model.blocks) >= 1
    out = forward_backward(model, example_input(name))
    assert out.shape == (3, 5)
    assert torch.isfinite(out).all()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("gate", ["plain", "residual", "highway", "gated"])
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet20_cifar", "preact_resnet164_cifar",
                                  "highway_mlp", "highway_cnn_cifar"])
def test_every_gate_on_every_body(name, gate):
    torch.manual_seed(0)
    model = create_model(name, gate=gate, **tiny(name))
    out = forward_backward(model, example_input(name))
    assert torch.isfinite(out).all()
    n_gates = sum(isinstance(m, Gate) for m in model.modules())
    n_blocks = sum(type(b).__name__ == "ResidualBlock" for b in model.blocks)
    assert n_gates == {"plain": 0, "residual": 0, "highway": 1, "gated": 2}[gate] * n_blocks


@pytest.mark.parametrize(
    "name, expected",
    [("resnet18", None), ("resnet34", None), ("resnet50", None), ("resnet101", None), ("resnet152", None)],
)
def test_imagenet_parameter_counts_equal_torchvision(name, expected):
    ours = sum(p.numel() for p in create_model(name).parameters())
    theirs = sum(p.numel() for p in getattr(torchvision.models, name)().parameters())
    assert ours == theirs
    if name == "resnet50":
        assert ours == 25_557_032


@pytest.mark.parametrize(
    "name, paper_millions",
    [("resnet20_cifar", 0.27), ("resnet56_cifar", 0.85), ("resnet110_cifar", 1.7), ("resnet1202_cifar", 19.4),
     ("preact_resnet164_cifar", 1.7), ("preact_resnet1001_cifar", 10.2), ("highway_cnn_cifar", 2.3),
     ("plain_mlp", 12.11)],  # Ciresan et al. 2010 report 12.11 M weights; 784-2500-...-500-10 has 11.97 M
)
def test_parameter_counts_match_papers(name, paper_millions):
    with torch.device("meta"):
        n = sum(p.numel() for p in create_model(name).parameters())
    assert math.isclose(n / 1e6, paper_millions, rel_tol=0.02), f"{name}: {n / 1e6:.3f} M"


def test_very_deep_models_build_with_the_right_depth():
    with torch.device("meta"):
        assert len(create_model("resnet1202_cifar").blocks) == 600
        assert len(create_model("preact_resnet1001_cifar").blocks) == 333
        assert len(create_model("resnet200").blocks) == 66
        assert len(create_model("resnet50", layers=[3, 4, 60, 3]).blocks) == 70


def _pin_all_gates(model, value):
    for m in model.modules():
        if isinstance(m, Gate):
            m.pin(value)


@pytest.mark.parametrize("name", ["resnet20_cifar", "resnet18", "preact_resnet164_cifar", "highway_mlp"])
def test_gated_with_gates_pinned_open_is_exactly_residual(name):
    torch.manual_seed(0)
    gated = create_model(name, gate="gated", **tiny(name)).eval()
    residual = create_model(name, gate="residual", **tiny(name)).eval()
    missing, unexpected = residual.load_state_dict(gated.state_dict(), strict=False)
    assert not missing and all("gate" in k for k in unexpected)
    _pin_all_gates(gated, 1.0)
    x = example_input(name)
    assert torch.equal(gated(x), residual(x))
    _pin_all_gates(gated, None)  # unpinned, the carry gate is only almost open: not the same
    assert not torch.equal(gated(x), residual(x))


def test_highway_is_coupled_and_starts_near_identity():
    torch.manual_seed(0)
    model = create_model("highway_mlp", depth=11, width=8, in_features=8)
    block = model.blocks[0]
    x = torch.randn(4, 8)
    t = block.transform_gate(x)
    expected = (1 - t) * x + t * block.body(x)
    assert torch.allclose(block(x), expected, atol=1e-6)
    # depth-aware bias −ln(10) − 1: every gate starts at σ(b) ≈ 0.037
    assert torch.allclose(block.transform_gate.proj.bias, torch.full((8,), -math.log(10) - 1))


@pytest.mark.parametrize("depth", [100, 1000])
def test_error_flow_highway_default_bias_stays_near_one(depth):
    torch.manual_seed(0)
    ratio = error_flow_ratio(create_model("highway_mlp", depth=depth), torch.randn(32, 784))
    assert 0.3 <= ratio <= 3, ratio


def test_error_flow_plain_tanh_net_vanishes():
    torch.manual_seed(0)
    ratio = error_flow_ratio(create_model("highway_mlp", depth=100, gate="plain", activation="tanh"),
                             torch.randn(32, 784))
    assert not (0.1 <= ratio <= 10), ratio


def test_error_flow_residual_nets_start_as_identity():
    torch.manual_seed(0)
    ratio = error_flow_ratio(create_model("resnet20_cifar", depth=56, num_classes=10), torch.randn(4, 3, 32, 32))
    # only the two option-A shortcuts (subsample + pad) are not identities
    assert 0.3 <= ratio <= 3, ratio
    assert error_flow_ratio(create_model("highway_mlp", depth=300, gate="residual"), torch.randn(8, 784)) == 1.0


def test_low_carry_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="deepres"):
        create_model("highway_mlp", depth=1000, gate_bias=-3, width=4)
    assert any("carry product" in r.message and "gate_bias='auto'" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="deepres"):
        create_model("highway_mlp", depth=1000, width=4)  # depth-aware default: no warning
        create_model("highway_mlp", depth=20, gate_bias=-3, width=4)  # 0.953^19 = 0.4: fine
    assert not caplog.records


def test_lstm_cells():
    m97 = create_model("lstm", cell="1997", hidden_size=4)
    m99 = create_model("lstm", cell="1999", hidden_size=4, forget_bias=1.5)
    assert m97.blocks[0].cell.forget_gate is None
    assert torch.allclose(m99.blocks[0].cell.input_proj.bias[12:], torch.full((4,), 1.5))
    # 1997: f ≡ 1, so with the input gate closed the cell state is carried exactly.
    cell = m97.blocks[0].cell
    with torch.no_grad():
        cell.input_proj.bias[:4] = -1e4  # i = σ(−1e4) = 0
    c = torch.randn(2, 4)
    _, c_next = cell.step(cell.input_proj(torch.randn(2, 2)), torch.randn(2, 4), c)
    assert torch.equal(c_next, c)


def test_depth_lstm_shared_weights():
    shared = create_model("depth_lstm", depth=10, width=8, in_features=16, share_weights=True)
    unshared = create_model("depth_lstm", depth=10, width=8, in_features=16)
    n_shared = sum(p.numel() for p in shared.parameters())
    n_unshared = sum(p.numel() for p in unshared.parameters())
    assert n_unshared - n_shared == 9 * sum(p.numel() for p in shared.blocks[0].parameters())


@pytest.mark.parametrize(
    "name, kwargs, fragment",
    [
        ("resnet51", {}, "Did you mean 'resnet50'"),
        ("resnet20_cifar", {"depth": 21}, "Valid neighbours: 20, 26"),
        ("cifar_resnet", {"depth": 1201}, "Valid neighbours: 1196, 1202"),
        ("preact_resnet_cifar", {"depth": 1000}, "Valid neighbours: 992, 1001"),
        ("preact_resnet_cifar", {"depth": 3}, "Valid neighbours: 11"),
        ("highway_mlp", {"depht": 10}, "did you mean 'depth'"),
        ("highway_mlp", {"gate": "highwy"}, "Valid gates: plain, residual, highway, gated"),
        ("highway_mlp", {"depth": 1}, "depth >= 2"),
        ("lstm", {"cell": "gru"}, "Valid cells"),
    ],
)
def test_invalid_names_and_depths_give_clear_errors(name, kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        create_model(name, **kwargs)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_pointwise_gate_conv_computes_what_conv2d_computes(stride, channels_last):
    from deepres.models.blocks import GroupedPointwiseConv

    torch.manual_seed(0)
    fast = GroupedPointwiseConv(64, 128, 1, stride=stride, groups=4)
    ref = torch.nn.Conv2d(64, 128, 1, stride=stride, groups=4)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 64, 9, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    ys = [fast(xs[0]), ref(xs[1])]
    torch.testing.assert_close(ys[0], ys[1])
    for y in ys:
        y.square().sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(fast.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
