"""`depth_scaling="completep"`: each block's change × 1/L, and the matching per-group optimizer settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepres.errors import ConfigError
from deepres.models import create_model
from deepres.models.depth_scaling import branch_multiplier, hidden_depth_ratios, hidden_rule
from deepres.training.config import OptimizerConfig
from deepres.training.optim import build_optimizer, implementation, param_groups

MEMBERS = [{"gate": "highway"}, {"gate": "gated"}, {"gate": "residual"}, {"gate": "residual", "init": "rezero"},
           {"gate": "residual", "init": "layerscale"}, {"gate": "residual", "init": "fixup"},
           {"gate": "residual", "init": "deepnorm"}]


def mlp(depth: int, width: int = 6, **kwargs):
    return create_model("highway_mlp", depth=depth, width=width, in_features=5, num_classes=3, **kwargs)


@pytest.mark.parametrize("member", MEMBERS, ids=lambda m: "+".join(m.values()))
@pytest.mark.parametrize("depth", [2, 11, 101])
def test_every_block_changes_its_input_by_one_over_L_of_its_unscaled_change(member, depth):
    torch.manual_seed(0)
    model = mlp(depth, depth_scaling="completep", **member)
    num_blocks = depth - 1
    assert branch_multiplier(num_blocks) == 1 / num_blocks
    x = torch.randn(4, 6)
    for block in model.blocks:
        assert block.depth_multiplier == pytest.approx(1 / num_blocks)
        with torch.no_grad():  # random weights, so that the merge differs from the carry
            for p in block.parameters():
                p.normal_(0, 0.5)
        post, block.post = block.post, None  # DeepNorm's norm comes after the merge: compare before it
        y = block(x)
        block.depth_multiplier = 1.0
        merge = block(x)
        block.depth_multiplier, block.post = 1 / num_blocks, post
        carried = x * block.carry_scale
        assert not torch.allclose(merge, carried)
        torch.testing.assert_close(y, carried + (merge - carried) / num_blocks)


def test_depth_dependent_initial_values_are_those_of_one_block():
    for depth in (10, 300):
        highway = mlp(depth, depth_scaling="completep")
        assert highway.blocks[0].transform_gate.initial_bias == pytest.approx(-1.0)  # −ln(1) − 1
        gated = mlp(depth, gate="gated", depth_scaling="completep")
        assert gated.blocks[0].carry_gate.initial_bias == pytest.approx(1.0)
        layerscale = mlp(depth, gate="residual", init="layerscale", depth_scaling="completep")
        assert torch.all(layerscale.blocks[0].branch_scale.weight == 0.1)  # ε for one block, not 1e-6
    assert mlp(300).blocks[0].transform_gate.initial_bias == pytest.approx(-math.log(299) - 1)  # the switch off


@pytest.mark.parametrize("depth", [3, 11, 101, 1001])
def test_sgd_groups_follow_the_rule(depth):
    weight_decay, lr = 1e-3, 0.05
    model = mlp(depth, depth_scaling="completep")
    hidden = {id(p) for p in model.blocks.parameters()}
    assert set(hidden_depth_ratios(model)) == hidden
    groups = build_optimizer(model, OptimizerConfig(name="sgd", lr=lr, weight_decay=weight_decay)).param_groups
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    L = depth - 1
    for g in groups:
        ids = {id(p) for p in g["params"]}
        matrices = all(p.ndim > 1 for p in g["params"])
        if ids <= hidden and ids:
            assert g["lr"] == pytest.approx(lr * L)
            assert g["weight_decay"] == pytest.approx(weight_decay / L if matrices else 0.0)
        else:
            assert not ids & hidden
            assert g["lr"] == lr and g["weight_decay"] == (weight_decay if matrices else 0.0)
    # the shrink per step of a hidden matrix, lr·decay, is the same at every depth
    hidden_matrix = next(g for g in groups if g["weight_decay"] and {id(p) for p in g["params"]} <= hidden)
    assert hidden_matrix["lr"] * hidden_matrix["weight_decay"] == pytest.approx(lr * weight_decay)


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("depth", [11, 1001])
def test_adam_groups_keep_lr_and_decay_and_scale_eps(name, depth):
    model = mlp(depth, depth_scaling="completep")
    hidden = {id(p) for p in model.blocks.parameters()}
    opt = build_optimizer(model, OptimizerConfig(name=name, lr=1e-3, weight_decay=0.1))
    for g in opt.param_groups:
        in_blocks = {id(p) for p in g["params"]} <= hidden and g["params"]
        assert g["lr"] == 1e-3
        assert g["eps"] == pytest.approx(1e-8 / (depth - 1) if in_blocks else 1e-8)
        assert g["weight_decay"] == (0.1 if g["params"][0].ndim > 1 else 0.0)
    assert hidden_rule(name, 50.0).eps == pytest.approx(1 / 50)


def test_hidden_sgd_step_moves_a_deep_block_as_much_as_a_shallow_one():
    """Why lr × L: a scaled block's gradient carries the 1/L, so the step on its weights is depth-independent."""
    steps = {}
    torch.manual_seed(0)
    shallow = mlp(11, gate="residual", init="rezero", depth_scaling="completep")
    with torch.no_grad():
        shallow.blocks[0].branch_scale.weight.fill_(1.0)  # block 0 open, the others the identity (α = 0)
    for depth in (11, 1001):
        model = mlp(depth, gate="residual", init="rezero", depth_scaling="completep")
        for part in ("stem", "head"):  # the same net but for the number of identity blocks
            getattr(model, part).load_state_dict(getattr(shallow, part).state_dict())
        model.blocks[0].load_state_dict(shallow.blocks[0].state_dict())
        opt = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.1, momentum=0.0))
        torch.manual_seed(1)
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        before = model.blocks[0].body[0].weight.detach().clone()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        steps[depth] = (model.blocks[0].body[0].weight - before).norm().item()
    assert steps[11] > 0
    assert steps[1001] == pytest.approx(steps[11], rel=0.2)


def test_switch_off_is_bit_identical_to_the_argument_absent_and_to_two_plain_groups():
    def train(model, opt, steps=3):
        torch.manual_seed(5)
        for _ in range(steps):
            x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    cfg = OptimizerConfig(name="sgd", lr=0.05, weight_decay=1e-3)
    runs = []
    for kwargs in ({}, {"depth_scaling": "none"}):
        torch.manual_seed(0)
        model = mlp(12, **kwargs)
        runs.append(train(model, build_optimizer(model, cfg)))
    # today's optimizer, written out: matrices decayed, vectors not, one lr
    torch.manual_seed(0)
    model = mlp(12)
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 1e-3},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    runs.append(train(model, torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True, **implementation(model))))
    for a, b, c in zip(*runs, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert len(param_groups(mlp(12), 1e-3)) == 2 and hidden_depth_ratios(mlp(12)) == {}


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"depth_scaling": "mup"}, "unknown depth_scaling 'mup'"),
    ({"gate": "plain", "depth_scaling": "completep"}, "plain blocks"),
    ({"reversible": True, "depth_scaling": "completep"}, "reversible=false"),
])
def test_bad_settings_name_the_fix(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        mlp(6, **kwargs)


def test_fit_with_the_switch_trains(tmp_path):
    from deepres.training.checkpoints import load_module
    from deepres.training.cli import main
    from deepres.training.module import Classifier

    rc = main(["fit", "--model.depth", "30", "--model.depth_scaling", "completep", "--trainer.max_steps", "25",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
               "--trainer.num_sanity_val_steps", "0", "--wandb.enabled", "false",
               "--run.root", str(tmp_path), "--run.name", "completep"])
    assert rc == 0
    module = load_module(Classifier, tmp_path / "completep" / "checkpoints" / "last.ckpt").eval()
    assert module.net.blocks[0].depth_multiplier == pytest.approx(1 / 29)
    from deepres.data import DigitsDataModule

    data = DigitsDataModule()
    data.setup("fit")
    x, y = data.train_set.tensors
    with torch.no_grad():
        loss = F.cross_entropy(module(x), y).item()
    assert math.isfinite(loss) and loss < 0.8 * math.log(10)


# ---------------------------------------------------------------- the multi-stream members
HYPER = [{"gate": "hc"}, {"gate": "mhc"}, {"gate": "mhc", "dynamic": False}, {"gate": "mhc_lite"}]


@pytest.mark.parametrize("member", HYPER, ids=lambda m: "+".join(str(v) for v in m.values()))
@pytest.mark.parametrize("depth", [2, 11, 101])
def test_a_multi_stream_block_changes_its_streams_by_one_over_L_of_its_unscaled_change(member, depth):
    torch.manual_seed(0)
    model = mlp(depth, depth_scaling="completep", streams=4, **member)
    num_blocks = depth - 1
    streams = torch.randn(3, 6, 4)  # (B, C, n)
    for block in list(model.blocks)[:3]:
        assert block.depth_multiplier == pytest.approx(1 / num_blocks)
        with torch.no_grad():  # off the init, so that the block changes its streams
            for p in block.parameters():
                p.add_(0.5 * torch.randn_like(p))
        y = block(streams)
        block.depth_multiplier = 1.0
        full = block(streams)
        block.depth_multiplier = 1 / num_blocks
        assert not torch.allclose(full, streams)
        torch.testing.assert_close(y, streams + (full - streams) / num_blocks)


@pytest.mark.parametrize("dynamic", [True, False])
def test_the_composite_diagnostic_sees_the_scaled_mixing_still_doubly_stochastic(dynamic):
    from deepres.models.hyper import composite_gain, residual_matrices

    torch.manual_seed(0)
    model = mlp(21, depth_scaling="completep", gate="mhc", streams=4, dynamic=dynamic)
    with torch.no_grad():
        for p in model.blocks.parameters():
            p.add_(torch.randn_like(p))
        streams = model.stem(torch.randn(5, 5))
    scaled = residual_matrices(model.blocks, streams)
    for block in model.blocks:
        block.depth_multiplier = 1.0
    plain = residual_matrices(model.blocks, streams)
    eye = torch.eye(4)
    # dynamic mixings depend on the streams a block receives, which the multiplier changes after block 0
    compared = zip(scaled, plain, strict=True) if not dynamic else [(scaled[0], plain[0])]
    for s, p in compared:
        torch.testing.assert_close(s, eye + (p - eye) / 20)  # (1 − 1/L)·I + H^res/L
    gain = composite_gain(scaled)
    assert abs(gain.composite_max_col_sum - 1) < 1e-5 and abs(gain.composite_min_col_sum - 1) < 1e-5


def test_multi_stream_blocks_get_the_hidden_rule_and_the_post_gate_of_one_block():
    from deepres.models.hyper import HyperBlock

    depth, lr = 101, 0.05
    model = mlp(depth, depth_scaling="completep", gate="mhc", streams=4)
    hidden = {id(p) for p in model.blocks.parameters()}
    assert hidden and set(hidden_depth_ratios(model)) == hidden
    for g in build_optimizer(model, OptimizerConfig(name="sgd", lr=lr)).param_groups:
        ids = {id(p) for p in g["params"]}
        assert g["lr"] == pytest.approx(lr * (depth - 1) if ids <= hidden else lr)
    block = model.blocks[0]
    assert isinstance(block, HyperBlock)
    # H^post = 2σ(−ln 1 − 1) for one block (the multiplier does what −ln(L) − 1 does without the switch)
    torch.testing.assert_close(block.mixing.post_bias, torch.full((4,), -1.0))
    assert mlp(depth, gate="mhc", streams=4).blocks[0].mixing.post_bias[0].item() == pytest.approx(-math.log(100) - 1)


def test_multi_stream_switch_off_is_bit_identical_to_the_argument_absent():
    outs = []
    for kwargs in ({}, {"depth_scaling": "none"}):
        torch.manual_seed(0)
        model = mlp(8, gate="mhc", streams=4, **kwargs)
        opt = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.05))
        torch.manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        outs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))


def test_fit_with_the_switch_on_mhc_trains_with_scaled_blocks(tmp_path):
    """The command a user runs: `deepres fit --model.gate mhc --model.depth_scaling completep`."""
    from deepres.training.checkpoints import load_module
    from deepres.training.cli import main
    from deepres.training.module import Classifier

    rc = main(["fit", "--model.gate", "mhc", "--model.depth", "8", "--model.depth_scaling", "completep",
               "--trainer.max_steps", "4", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false", "--trainer.num_sanity_val_steps", "0",
               "--wandb.enabled", "false", "--run.root", str(tmp_path), "--run.name", "mhc"])
    assert rc == 0
    plan = (tmp_path / "mhc" / "plan.json").read_text()
    assert '"depth_scaling": "completep"' in plan and '"gate": "mhc"' in plan
    module = load_module(Classifier, tmp_path / "mhc" / "checkpoints" / "last.ckpt")
    assert all(b.depth_multiplier == pytest.approx(1 / 7) for b in module.net.blocks)
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
