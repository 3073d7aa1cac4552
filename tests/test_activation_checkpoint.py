"""Activation checkpointing applied from outside changes neither results nor parameter names."""

import copy

import pytest
import torch

from deepres.errors import ConfigError
from deepres.models import create_model
from deepres.parallelize.activation_checkpoint import apply_activation_checkpointing, checkpoint_interval

CASES = [
    ("resnet20_cifar", {"depth": 14}, (4, 3, 16, 16)),  # batch norm: running stats must match too
    ("preact_resnet_cifar", {"depth": 11}, (4, 3, 16, 16)),
    ("highway_mlp", {"depth": 13, "width": 8, "in_features": 10}, (4, 10)),
    ("depth_lstm", {"depth": 7, "width": 8, "in_features": 10}, (4, 10)),  # tuple state through blocks
    ("lstm", {"hidden_size": 8, "num_layers": 3}, (4, 5, 2)),
]


def run(model, x):
    out = model(x)
    out.sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("every", [1, 2, 3, "sqrt", "all"])
@pytest.mark.parametrize("name, kwargs, shape", CASES)
def test_checkpointed_equals_unwrapped(name, kwargs, shape, every):
    torch.manual_seed(0)
    ref = create_model(name, **kwargs)
    ckpt = copy.deepcopy(ref)
    k = apply_activation_checkpointing(ckpt, every)
    assert k >= 1 and ckpt.blocks.checkpoint_every == k
    assert list(ckpt.state_dict()) == list(ref.state_dict())  # names unchanged
    x = torch.randn(*shape)
    out_ref, g_ref = run(ref, x)
    out_ck, g_ck = run(ckpt, x)
    assert torch.allclose(out_ref, out_ck, atol=1e-6, rtol=1e-5)
    for n in g_ref:
        assert torch.allclose(g_ref[n], g_ck[n], atol=1e-6, rtol=1e-5), n
    for (n, a), b in zip(ref.state_dict().items(), ckpt.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"buffer {n} differs (recomputation must not update running stats)"


def test_interval_choices():
    assert checkpoint_interval(1000, "sqrt") == 32
    assert checkpoint_interval(333, "sqrt") == 18
    assert checkpoint_interval(10, "all") == 10
    assert checkpoint_interval(10, 0) == 0
    with pytest.raises(ConfigError, match="integer >= 1, 'sqrt'"):
        checkpoint_interval(10, -2)


def test_checkpointing_actually_recomputes():
    """With checkpointing, every block's forward starts twice per step (once more in backward),
    except the last segment's, whose activations backward needs first and which is kept."""
    model = create_model("highway_mlp", depth=9, width=4, in_features=4)
    calls = []
    for b in model.blocks:
        b.register_forward_pre_hook(lambda *_: calls.append(1))
    apply_activation_checkpointing(model, 2)
    model(torch.randn(2, 4)).sum().backward()
    assert len(model.blocks) == 8  # segments [0,1] [2,3] [4,5] checkpointed, [6,7] kept
    assert len(calls) == 8 + 6


@pytest.mark.parametrize("every", ["selective", "selective:3", "selective:sqrt"])
@pytest.mark.parametrize("name, kwargs, shape", CASES)
def test_selective_checkpointing_gives_the_same_gradients(name, kwargs, shape, every):
    torch.manual_seed(0)
    ref = create_model(name, **kwargs)
    ckpt = copy.deepcopy(ref)
    assert apply_activation_checkpointing(ckpt, every) >= 1
    x = torch.randn(*shape)
    out_ref, g_ref = run(ref, x)
    out_ck, g_ck = run(ckpt, x)
    assert torch.equal(out_ref, out_ck)
    flat_ref = torch.cat([g.flatten() for g in g_ref.values()])
    flat_ck = torch.cat([g_ck[n].flatten() for n in g_ref])
    assert ((flat_ck - flat_ref).norm() / flat_ref.norm()).item() <= 1e-6
    for (n, a), b in zip(ref.state_dict().items(), ckpt.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"buffer {n} differs (recomputation must not update running stats)"


def test_selective_keeps_matmul_outputs_and_recomputes_the_rest():
    """Memory: less than storing everything, more than storing block inputs only; and the trailing
    conv of pre-activation bodies is not kept (that alone would cost a full tensor per block)."""
    from deepres.parallelize.memory_budget import step_peak_bytes

    x = torch.randn(16, 3, 16, 16)  # activations well above the parameter gradients
    peaks = {}
    for every in (0, "selective", 1):
        torch.manual_seed(0)
        net = create_model("preact_resnet_cifar", depth=56)
        apply_activation_checkpointing(net, every) if every else None
        peaks[every] = step_peak_bytes(net, x)
    assert peaks[1] < peaks["selective"] < 0.75 * peaks[0], peaks


def test_selective_setting_is_validated():
    model = create_model("highway_mlp", depth=5, width=4, in_features=4)
    with pytest.raises(ConfigError, match="'selective:K'"):
        apply_activation_checkpointing(model, "selectiveX")
    with pytest.raises(ConfigError, match="integer >= 1"):
        apply_activation_checkpointing(model, "selective:-1")


def test_auto_picks_checkpointing_only_when_the_budget_needs_it():
    from deepres.parallelize import parallelize
    from deepres.parallelize.memory_budget import step_peak_bytes

    batch = 256
    x = torch.randn(batch, 16)
    measured = {}
    chosen = {}
    for budget_gb in (10.0, 0.004):  # 10 GB: anything fits; 4 MB: storing every block's activations does not
        torch.manual_seed(0)
        net = create_model("highway_mlp", depth=201, width=32, in_features=16)
        before = copy.deepcopy(net.state_dict())
        chosen[budget_gb] = parallelize(net, activation_checkpointing="auto", memory_budget_gb=budget_gb,
                                        example_input=x[:8], batch_size=batch)
        assert all(p.grad is None for p in net.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before.values(), net.state_dict().values(), strict=True))
        measured[budget_gb] = step_peak_bytes(net, x)  # the chosen setting, at the training batch
        from deepres.parallelize.memory_budget import choose_checkpointing

        choice = choose_checkpointing(net, x[:8], batch, budget_gb)
        assert choice.setting == chosen[budget_gb]
        # the prediction from two batches of 4 and 8 samples, against the step at 256
        assert abs(choice.predicted_peak_bytes - measured[budget_gb]) <= 0.2 * measured[budget_gb], \
            (choice.predictions, measured[budget_gb])
    assert chosen[10.0] == "none" and net.blocks.checkpoint_every >= 1
    assert chosen[0.004] in ("selective", "sqrt")
    assert measured[0.004] <= 0.004 * 2**30 < measured[10.0]


def test_auto_refuses_what_cannot_fit_and_says_what_to_do():
    from deepres.parallelize import parallelize

    net = create_model("highway_mlp", depth=21, width=32, in_features=16)
    with pytest.raises(ConfigError, match="smaller per-device batch"):
        parallelize(net, activation_checkpointing="auto", memory_budget_gb=1e-6, example_input=torch.randn(4, 16),
                    batch_size=64)
    with pytest.raises(ConfigError, match="needs example_input"):
        parallelize(net, activation_checkpointing="auto", memory_budget_gb=1.0)


def test_auto_logs_its_choice_and_the_predicted_peak(caplog):
    import logging

    from deepres.parallelize import parallelize

    net = create_model("highway_mlp", depth=21, width=32, in_features=16)
    with caplog.at_level(logging.INFO, logger="deepres"):
        chosen = parallelize(net, activation_checkpointing="auto", memory_budget_gb=10.0,
                             example_input=torch.randn(4, 16), batch_size=64)
    assert chosen == "none"
    assert "chose 'none', predicted step peak" in caplog.text and "at batch 64" in caplog.text
