"""Each depth-aware init preset has, at initialisation, the property its paper states; stochastic
depth keeps each block with its scheduled probability, is the identity in eval mode, and a dropped
block gets no gradient (docs/science.md#depth-aware-initialisation-presets, #stochastic-depth)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deepres.errors import ConfigError
from deepres.models import create_model
from deepres.models.blocks import ResidualBlock
from deepres.models.error_flow import error_flow_ratio
from deepres.models.init_presets import (
    BranchScale,
    FixupOutput,
    critical_point,
    deepnorm_alpha,
    deepnorm_beta,
    fixup_scale,
    layerscale_epsilon,
)

NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def residual_blocks(model):
    return [b for b in model.blocks if isinstance(b, ResidualBlock)]


def block_io(model, x):
    """(input, output) of every block for one forward."""
    pairs = []
    handles = [b.register_forward_hook(lambda m, a, o: pairs.append((a[0].detach().clone(), o.detach().clone())))
               for b in residual_blocks(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return pairs


DENSE = dict(depth=20, width=16, in_features=12, num_classes=5)
CONV_NETS = [("resnet20_cifar", {}), ("preact_resnet164_cifar", dict(depth=29)), ("resnet18", {})]


def conv_input(name):
    return torch.randn(2, 3, 64, 64) if name == "resnet18" else torch.randn(2, 3, 16, 16)


# ----------------------------------------------------------------------------------------------
# ReZero / SkipInit: every block is exactly the identity
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["rezero", "skipinit"])
def test_rezero_and_skipinit_blocks_are_exactly_the_identity(init):
    torch.manual_seed(0)
    model = create_model("highway_mlp", gate="residual", init=init, **DENSE).train()
    pairs = block_io(model, torch.randn(8, 12))
    assert len(pairs) == 19
    for x, y in pairs:
        assert torch.equal(x, y)
    for b in residual_blocks(model):
        assert isinstance(b.branch_scale, BranchScale) and b.branch_scale.weight.item() == 0.0
        assert b.branch_scale.weight.requires_grad
        assert b.body[0].weight.abs().sum() > 0  # the branch itself is not zeroed: α alone closes it
    # SkipInit's bound α < 1/√L holds at α = 0; the branch scale gets a gradient at init
    loss = nn.functional.cross_entropy(model(torch.randn(8, 12)), torch.randint(0, 5, (8,)))
    loss.backward()
    assert all(b.branch_scale.weight.grad.abs().item() > 0 for b in residual_blocks(model))


@pytest.mark.parametrize("name,kwargs", CONV_NETS)
def test_rezero_conv_blocks_without_shape_change_are_the_identity_and_norm_free(name, kwargs):
    model = create_model(name, init="rezero", **kwargs).train()
    assert not any(isinstance(m, NORMS) for m in model.modules())
    for x, y in block_io(model, conv_input(name)):
        if x.shape == y.shape:
            expected = x if residual_blocks(model)[0].post is None else torch.relu(x)
            assert torch.equal(y, expected)


# ----------------------------------------------------------------------------------------------
# Fixup: branches output zero, classifier zero, no norm layers, rescaled branch layers
# ----------------------------------------------------------------------------------------------
def test_fixup_dense_branches_and_classifier_are_zero_and_there_is_no_norm():
    torch.manual_seed(0)
    model = create_model("highway_mlp", gate="residual", init="fixup", **DENSE)
    assert not any(isinstance(m, NORMS) for m in model.modules())
    assert model.head.weight.abs().sum() == 0 and model.head.bias.abs().sum() == 0
    L = 19
    for b in residual_blocks(model):
        with torch.no_grad():
            assert b.body(torch.randn(4, 16)).abs().max() == 0  # the branch outputs zero
        assert isinstance(b.branch_scale, FixupOutput)
        # the first layer is He × L^(−1/2): its std is sqrt(2/fan_in)·L^(−1/2) within sampling error
        std = b.body.fc1.weight.std().item()
        assert std == pytest.approx(math.sqrt(2 / 16) * fixup_scale(L, 2), rel=0.25)
    assert fixup_scale(L, 2) == pytest.approx(L ** -0.5)
    # it trains: one SGD step moves the loss (zero classifier gets a gradient from the features)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = nn.functional.cross_entropy(model(x), y)
    first.backward()
    opt.step()
    assert nn.functional.cross_entropy(model(x), y) < first


@pytest.mark.parametrize("name,kwargs", CONV_NETS)
def test_fixup_conv_branches_output_zero_classifier_zero_no_norm(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, init="fixup", **kwargs)
    assert not any(isinstance(m, NORMS) for m in model.modules())
    head = [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1]
    assert head.weight.abs().sum() == 0 and head.bias.abs().sum() == 0
    blocks = residual_blocks(model)
    L = len(blocks)
    convs_per_branch = len([m for m in blocks[0].body.modules() if isinstance(m, nn.Conv2d)])
    scale = fixup_scale(L, convs_per_branch)
    for b in blocks:
        convs = [m for m in b.body.modules() if isinstance(m, nn.Conv2d)]
        assert convs[-1].weight.abs().sum() == 0
        first = convs[0]
        fan_out = first.out_channels * first.kernel_size[0] * first.kernel_size[1]
        assert first.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out) * scale, rel=0.3)
    outs = []
    hooks = [getattr(b.body, "branch", b.body).register_forward_hook(lambda m, a, o: outs.append(o)) for b in blocks]
    with torch.no_grad():
        model(conv_input(name))
    for h in hooks:
        h.remove()
    assert len(outs) == L and all(o.abs().max() == 0 for o in outs)


def test_fixup_refuses_a_norm():
    with pytest.raises(ConfigError, match="without normalisation"):
        create_model("resnet20_cifar", init="fixup", norm="batch")


# ----------------------------------------------------------------------------------------------
# LayerScale and DeepNorm
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth,eps", [(10, 0.1), (19, 0.1), (23, 1e-5), (25, 1e-5), (101, 1e-6)])
def test_layerscale_diagonal_equals_its_epsilon(depth, eps):
    model = create_model("highway_mlp", gate="residual", init="layerscale", depth=depth, width=8, in_features=4)
    L = depth - 1
    assert layerscale_epsilon(L) == eps
    for b in residual_blocks(model):
        assert b.branch_scale.weight.shape == (8,)
        assert torch.all(b.branch_scale.weight == torch.tensor(eps, dtype=torch.float32))


def test_layerscale_conv_diagonal_is_per_channel():
    model = create_model("resnet20_cifar", init="layerscale", norm="group")
    for b in residual_blocks(model):
        channels = b.body.conv2.out_channels
        assert b.branch_scale.weight.shape == (channels, 1, 1)
        assert torch.all(b.branch_scale.weight == torch.tensor(layerscale_epsilon(9), dtype=torch.float32))
        assert isinstance(b.body.bn1, nn.GroupNorm)


@pytest.mark.parametrize("depth", [7, 101, 1001])
def test_deepnorm_scales_follow_the_number_of_blocks(depth):
    N = depth - 1
    torch.manual_seed(0)
    model = create_model("highway_mlp", gate="residual", init="deepnorm", depth=depth, width=64, in_features=8)
    plain = create_model("highway_mlp", gate="residual", init="rezero", depth=depth, width=64, in_features=8)
    assert deepnorm_alpha(N) == pytest.approx((2 * N) ** 0.25)
    assert deepnorm_beta(N) == pytest.approx((8 * N) ** -0.25)
    for b, ref in zip(residual_blocks(model), residual_blocks(plain), strict=True):
        assert b.carry_scale == pytest.approx((2 * N) ** 0.25)
        assert isinstance(b.post, nn.LayerNorm)  # Post-LN: y = LN(α·x + h(x))
        # branch weights are the He init (as the ReZero net's) times β
        ratio = b.body[0].weight.std() / ref.body[0].weight.std()
        assert ratio.item() == pytest.approx((8 * N) ** -0.25, rel=0.1)
    x = torch.randn(4, 64)
    b = residual_blocks(model)[0]
    with torch.no_grad():
        expected = nn.functional.layer_norm((2 * N) ** 0.25 * x + b.body(x), (64,), b.post.weight, b.post.bias)
        assert torch.allclose(b(x), expected, atol=1e-5)


def test_deepnorm_refuses_no_norm():
    with pytest.raises(ConfigError, match="deepnorm"):
        create_model("resnet20_cifar", init="deepnorm", norm="none")


# ----------------------------------------------------------------------------------------------
# Plain nets at criticality
# ----------------------------------------------------------------------------------------------
def test_critical_point_is_on_the_order_to_chaos_line():
    """Checked independently of the (Gauss-Hermite) quadrature: averages over 400,000 equally likely quantiles of
    z ~ N(0, 1) in float64 (a midpoint rule in probability, without Monte Carlo noise)."""
    assert critical_point("relu") == (2.0, 0.0)
    n = 400_000
    z = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    for sb2 in (1e-5, 0.05):
        sw2, got_sb2 = critical_point("tanh", sb2)
        assert got_sb2 == sb2 and sw2 > 1.0

        def excess(q: float, sw2: float = sw2, sb2: float = sb2) -> float:  # positive below the fixed point q*
            return sw2 * torch.tanh(math.sqrt(q) * z).pow(2).mean().item() + sb2 - q  # variance map minus identity

        low, high = 0.0, 1.0
        while excess(high) > 0:
            high *= 2
        for _ in range(50):  # bisection: the map's slope is close to 1 here, so iterating it converges slowly
            low, high = ((low + high) / 2, high) if excess((low + high) / 2) > 0 else (low, (low + high) / 2)
        q = (low + high) / 2
        chi = sw2 * (1 - torch.tanh(math.sqrt(q) * z).pow(2)).pow(2).mean().item()
        assert chi == pytest.approx(1.0, abs=1e-4)
    assert critical_point("tanh", 0.05)[0] > critical_point("tanh", 1e-5)[0]  # more bias needs more weight


def test_orthogonal_dense_layers_are_scaled_orthogonal():
    model = create_model("highway_mlp", gate="plain", init="orthogonal", activation="tanh", depth=6, width=16,
                         in_features=16)
    sw2, _ = critical_point("tanh")
    for b in residual_blocks(model):
        w = b.body[0].weight.detach()
        assert torch.allclose(w @ w.T, sw2 * torch.eye(16), atol=1e-5)


def test_delta_orthogonal_kernels_are_zero_except_an_orthogonal_centre():
    model = create_model("highway_cnn_cifar", gate="plain", init="delta_orthogonal", widths=[8], blocks_per_stage=[4],
                         in_chans=8)
    assert not any(isinstance(m, NORMS) for m in model.modules())
    for b in residual_blocks(model):
        w = b.body[0].weight.detach()
        centre = w[:, :, 1, 1]
        off = w.clone()
        off[:, :, 1, 1] = 0
        assert off.abs().sum() == 0
        assert torch.allclose(centre @ centre.T, 2.0 * torch.eye(8), atol=1e-5)  # ReLU: σ_w² = 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(gate="highway", init="rezero"), "needs gate='residual'"),
    (dict(gate="residual", init="orthogonal"), "plain nets"),
    (dict(gate="plain", init="delta_orthogonal"), "use init='orthogonal'"),
    (dict(gate="residual", init="zero"), "Valid presets"),
    (dict(gate="plain", drop_path=0.1), "carry path"),
    (dict(gate="residual", drop_path=1.0), r"\[0, 1\)"),
])
def test_bad_preset_combinations_are_refused_with_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_model("highway_mlp", depth=4, width=4, in_features=4, **kwargs)


# ----------------------------------------------------------------------------------------------
# Error flow at depth: every depth-aware preset keeps the ratio near 1
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [
    dict(gate="highway"), dict(gate="residual"), dict(gate="residual", init="rezero"),
    dict(gate="residual", init="skipinit"), dict(gate="residual", init="layerscale"),
    dict(gate="residual", init="fixup"), dict(gate="residual", init="deepnorm"),
])
def test_depth_aware_presets_keep_the_error_flowing_at_1000_blocks(kwargs):
    torch.manual_seed(0)
    model = create_model("highway_mlp", depth=1001, width=16, in_features=12, num_classes=5, **kwargs)
    ratio = error_flow_ratio(model, torch.randn(32, 12), torch.randint(0, 5, (32,)))
    assert 0.3 <= ratio <= 3.0, ratio


# ----------------------------------------------------------------------------------------------
# Stochastic depth
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", ["residual", "highway", "gated"])
def test_drop_path_keeps_each_block_with_its_scheduled_probability(gate):
    torch.manual_seed(0)
    rate, depth = 0.5, 11
    init = "rezero" if gate == "residual" else "default"  # a zero-initialised branch would hide the draw
    # width 64: a kept block changes every sample (an all-zero ReLU layer has probability 2^-64)
    model = create_model("highway_mlp", gate=gate, init=init, depth=depth, width=64, in_features=4,
                         drop_path=rate).train()
    blocks = residual_blocks(model)
    if gate == "residual":
        for b in blocks:
            b.branch_scale.weight.data.fill_(1.0)
    assert [b.drop_rate for b in blocks] == pytest.approx([rate * (i + 1) / 10 for i in range(10)])
    draws = 4000
    kept = torch.zeros(len(blocks))
    for i, b in enumerate(blocks):
        x = torch.randn(draws, 64)
        with torch.no_grad():
            y = b(x)
            b.eval()
            full = b(x)
            b.train()
        dropped = (y == x).all(dim=1)  # a dropped sample carries its input: y = x
        # a kept sample is the full block with its transform scaled by 1/(1 − p)
        keep = 1 - b.drop_rate
        assert torch.allclose(y[~dropped], x[~dropped] + (full - x)[~dropped] / keep, atol=1e-5)
        kept[i] = (~dropped).float().mean()
    expected = torch.tensor([1 - b.drop_rate for b in blocks])
    # 4000 Bernoulli draws: std ≤ 0.008; 4.5 std
    assert torch.all((kept - expected).abs() < 0.036), (kept, expected)


def test_drop_path_is_the_identity_in_eval_mode():
    torch.manual_seed(0)
    with_dp = create_model("highway_mlp", gate="residual", init="rezero", depth=30, width=8, in_features=4,
                           drop_path=0.5)
    torch.manual_seed(0)
    without = create_model("highway_mlp", gate="residual", init="rezero", depth=30, width=8, in_features=4)
    for b in residual_blocks(with_dp):
        b.branch_scale.weight.data.fill_(0.3)
    for b in residual_blocks(without):
        b.branch_scale.weight.data.fill_(0.3)
    x = torch.randn(16, 4)
    with_dp.eval()
    without.eval()
    assert torch.equal(with_dp(x), without(x))
    assert torch.equal(with_dp(x), with_dp(x))  # no draw in eval


@pytest.mark.parametrize("gate", ["residual", "highway"])
def test_dropped_blocks_get_no_gradient(gate):
    torch.manual_seed(0)
    init = "rezero" if gate == "residual" else "default"
    model = create_model("highway_mlp", gate=gate, init=init, depth=41, width=32, in_features=4,
                         drop_path=0.9).train()
    for b in residual_blocks(model):
        if b.branch_scale is not None:
            b.branch_scale.weight.data.fill_(1.0)  # a zero α would hide which blocks ran
    x, y = torch.randn(1, 4), torch.randint(0, 10, (1,))  # one sample: a block is either kept or dropped
    kept_flags = []
    hooks = [b.register_forward_hook(lambda m, a, o: kept_flags.append(not torch.equal(a[0], o)))
             for b in residual_blocks(model)]
    nn.functional.cross_entropy(model(x), y).backward()
    for h in hooks:
        h.remove()
    assert 0 < sum(kept_flags) < len(kept_flags)
    for b, kept in zip(residual_blocks(model), kept_flags, strict=True):
        grads = [p.grad for p in b.parameters()]
        if kept:
            assert any(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None or g.abs().sum() == 0 for g in grads)


def test_per_sample_drop_gradient_comes_only_from_kept_samples():
    torch.manual_seed(1)
    block = residual_blocks(create_model("highway_mlp", gate="residual", init="rezero", depth=3, width=8,
                                         in_features=4, drop_path=0.5))[-1].train()
    block.branch_scale.weight.data.fill_(1.0)
    x = torch.randn(64, 8)
    torch.manual_seed(5)
    y = block(x)
    dropped = (y == x).all(dim=1)
    assert 0 < dropped.sum() < 64
    y.pow(2).sum().backward()
    grad = block.body[0].weight.grad.clone()
    block.zero_grad()
    keep = 1 - block.drop_rate
    (x[~dropped] + block.body(x[~dropped]) / keep).pow(2).sum().backward()
    assert torch.allclose(grad, block.body[0].weight.grad, atol=1e-4)


def test_drop_path_schedule_on_conv_nets_reaches_the_rate_at_the_last_block():
    model = create_model("resnet20_cifar", drop_path=0.2)
    rates = [b.drop_rate for b in residual_blocks(model)]
    assert rates[-1] == pytest.approx(0.2) and rates[0] == pytest.approx(0.2 / 9)
    assert all(a < b for a, b in zip(rates, rates[1:], strict=False))
