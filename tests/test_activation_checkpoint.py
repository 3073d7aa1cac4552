"""Activation checkpointing applied from outside changes neither results nor parameter names."""

import copy

import pytest
import torch

from deepres.activation_checkpoint import apply_activation_checkpointing, checkpoint_interval
from deepres.errors import ConfigError
from deepres.models import create_model

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
