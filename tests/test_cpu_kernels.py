"""deepres's compiled CPU kernels (deepres.models.cpu_kernels): built where a compiler is, equal to the
PyTorch ops they replace, and replaced by those ops, with one line, where they cannot be built."""

import logging
import shutil

import pytest
import torch

from deepres.models import cpu_kernels, create_model
from deepres.models.stream_mixing_ops import (
    sinkhorn_backward,
    sinkhorn_exp,
    sinkhorn_exp_backward,
    sinkhorn_log,
)

HAS_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
needs_kernels = pytest.mark.skipif(not HAS_COMPILER, reason="no C++ compiler on this machine: the kernels cannot be built")


@needs_kernels
def test_the_kernels_build_where_a_compiler_is():
    assert cpu_kernels.available(), "a C++ compiler is on PATH but deepres's CPU kernels did not build"


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n, batch", [(4, 64), (1, 3), (6, 70), (4, 1)])
def test_the_sinkhorn_kernel_equals_the_pytorch_ops(dtype, n, batch):
    g = torch.Generator().manual_seed(n * 100 + batch)
    logits = 2.0 * torch.randn(n, n, batch, generator=g, dtype=dtype)
    if batch > 1:
        logits[..., 0] *= 40.0  # a matrix spanning ~100 nats: the kernel's log-domain branch
    grad = torch.randn(n, n, batch, generator=g, dtype=dtype)
    assert cpu_kernels.available()
    ours, ref = sinkhorn_exp(logits, 20), sinkhorn_log(logits, 20).exp()
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert torch.allclose(ours, ref, atol=tol, rtol=0)
    assert torch.allclose(ours.sum(0), torch.ones(n, batch, dtype=dtype), atol=10 * tol)  # columns normalised last
    g_ours, g_ref = sinkhorn_exp_backward(grad, logits, 20), sinkhorn_backward(grad, logits, 20)
    assert torch.allclose(g_ours, g_ref, atol=tol, rtol=0)
    if n > 1:  # (the 1 × 1 case is the constant 1, gradient 0)
        assert g_ref.abs().max() > 0.01  # a gradient, not zeros on both sides


@needs_kernels
def test_the_sinkhorn_kernels_gradient_matches_finite_differences():
    logits = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    assert cpu_kernels.available()
    from deepres.models.hyper import sinkhorn

    # sinkhorn() takes (…, n, n); the kernel runs on the (n, n, …) layout inside it
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x.movedim(-1, 0), 20), (logits,))


@needs_kernels
def test_an_mhc_net_trains_alike_with_and_without_the_kernels(monkeypatch):
    def step(seed):
        torch.manual_seed(seed)
        net = create_model("highway_mlp", depth=6, width=12, in_features=8, num_classes=3, gate="mhc", streams=4)
        x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])

    assert cpu_kernels.available()
    loss_k, grad_k = step(0)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    assert not cpu_kernels.available()
    loss_p, grad_p = step(0)
    assert torch.allclose(loss_k, loss_p, atol=1e-6)
    assert torch.allclose(grad_k, grad_p, atol=1e-6) and grad_p.abs().max() > 0


def test_a_failed_build_says_so_once_and_runs_the_pytorch_ops(monkeypatch, caplog):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension 'deepres_cpu_kernels': c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    logits = torch.randn(4, 4, 5)
    with caplog.at_level(logging.WARNING, logger="deepres"):
        out = sinkhorn_exp(logits, 20)
        sinkhorn_exp(logits, 20)
    assert torch.allclose(out, sinkhorn_log(logits, 20).exp())
    lines = [r.getMessage() for r in caplog.records if "CPU kernels" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "command not found" in lines[0] and "Fix:" in lines[0] and cpu_kernels.ENV_SWITCH in lines[0]


@needs_kernels
def test_the_kernels_have_shapes_for_the_compiler():
    assert cpu_kernels.available()
    logits, grad = torch.randn(4, 4, 8), torch.randn(4, 4, 8)
    checks = ("test_schema", "test_faketensor")
    for op, args in ((torch.ops.deepres.sinkhorn_forward.default, (logits, 20)),
                     (torch.ops.deepres.sinkhorn_backward.default, (grad, logits, 20))):
        assert all(v == "SUCCESS" for v in torch.library.opcheck(op, args, test_utils=checks).values())


@needs_kernels
def test_compiled_mhc_blocks_match_eager_with_the_kernels_on():
    """`--model.memory.compile true` compiles each block; an mhc block then calls the kernel as one opaque op."""
    def net():
        torch.manual_seed(0)
        return create_model("highway_mlp", depth=3, width=12, in_features=8, num_classes=3, gate="mhc", streams=4)

    assert cpu_kernels.available()
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    eager, compiled = net(), net()
    for block in compiled.blocks:
        block.compile()
    losses = []
    for model in (eager, compiled):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
