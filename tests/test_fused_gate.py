"""The fused gate: the same function and gradients as the separate ops, and out of the way of hooks."""

import copy

import pytest
import torch

from deepres.models import create_model
from deepres.models.blocks import ResidualBlock
from deepres.models.fused_gate import gated_mix, highway_mix


def test_fused_mixes_pass_gradcheck_with_broadcast_gates():
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(highway_mix, (r(2, 3, 4, 4), r(2, 3, 4, 4), r(2, 3, 4, 4)))
    assert torch.autograd.gradcheck(highway_mix, (r(2, 3, 4, 4), r(2, 3, 1, 1), r(2, 3, 4, 4)))  # a pooled gate
    assert torch.autograd.gradcheck(gated_mix, (r(2, 5), r(2, 5), r(2, 5), r(2, 5)))


@pytest.mark.parametrize("gate", ["highway", "gated"])
@pytest.mark.parametrize("name, kwargs, shape", [
    ("highway_mlp", {"depth": 6, "width": 8, "in_features": 8}, (4, 8)),
    ("resnet20_cifar", {"depth": 14}, (4, 3, 8, 8)),  # includes strided blocks with projection gates
])
def test_fused_equals_separate_ops(name, kwargs, shape, gate):
    torch.manual_seed(0)
    fused = create_model(name, gate=gate, **kwargs)
    separate = copy.deepcopy(fused)
    for block in separate.blocks:
        block.fused_gate = False
    x = torch.randn(*shape)
    outs, grads = [], []
    for model in (fused, separate):
        out = model(x)
        out.square().sum().backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(outs[0], outs[1], atol=1e-6)
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 1e-6


def test_hooked_or_pinned_gates_take_the_separate_ops():
    net = create_model("highway_mlp", depth=4, width=8, in_features=8)
    block: ResidualBlock = net.blocks[0]
    seen = []
    handle = block.transform_gate.register_forward_hook(lambda m, i, o: seen.append(o.mean().item()))
    net(torch.randn(2, 8))
    assert len(seen) == 1 and 0 < seen[0] < 1  # the hook saw σ, so the gate module ran
    handle.remove()
    net(torch.randn(2, 8))
    assert len(seen) == 1  # no hook: the fused op ran, not the module
    block.transform_gate.pin(1.0)  # a pinned gate is the constant, as without fusion
    x = torch.randn(2, 8)
    h = block.body(x)
    assert torch.allclose(block(x), h)


def test_a_gate_watched_in_forward_but_not_in_backward_recomputes_the_same_ops():
    """The diagnostics hook the gates for one forward and remove the hooks before backward; under
    activation checkpointing the recomputation must still run the separate gate ops it saved for."""
    import torch

    from deepres.models import create_model

    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=7, width=8, in_features=8, num_classes=3)
    net.blocks.checkpoint_every = 2
    x = torch.randn(4, 8)
    reference = torch.autograd.grad(net(x).square().sum(), list(net.parameters()))
    handle = net.blocks[0].transform_gate.register_forward_hook(lambda *_: None)
    out = net(x)
    handle.remove()
    grads = torch.autograd.grad(out.square().sum(), list(net.parameters()))
    for a, b in zip(grads, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert net.blocks[0].fused_gate is True  # the block runs fused again afterwards
