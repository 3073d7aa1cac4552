"""Reversible blocks: exact gradients from reconstructed inputs, exact inverses, refusals, composition."""

import copy

import pytest
import torch

from deepres.errors import ConfigError
from deepres.models import create_model
from deepres.models.reversible import ReversibleBlock, ReversibleStack, reversible_run

# (model, overrides, input shape): each body kind, each gate
BODIES = [
    ("highway_mlp", {"depth": 4, "width": 6, "in_features": 5, "body": "post"}, (3, 5)),
    ("highway_mlp", {"depth": 4, "width": 6, "in_features": 5, "body": "pre"}, (3, 5)),
    ("highway_cnn_cifar", {"widths": [4], "blocks_per_stage": [2], "in_chans": 2}, (3, 2, 5, 5)),
    ("cifar_resnet", {"depth": 14}, (3, 3, 4, 4)),  # basic conv body
    ("preact_resnet_cifar", {"depth": 20}, (2, 3, 4, 4)),  # pre-activation bottleneck body
]
GATES = ["residual", "highway", "gated"]


def _perturbed(net: torch.nn.Module) -> None:
    """Move every parameter off its init (zero-initialised bodies would hide terms of the gradient)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("name, kwargs, shape", BODIES)
def test_custom_backward_passes_gradcheck_in_float64(name, kwargs, shape, gate):
    """The input gradient by torch.autograd.gradcheck; the parameters' gradients, which the run
    accumulates into .grad during loss.backward(), against central differences along a random direction."""
    torch.manual_seed(0)
    net = create_model(name, gate=gate, reversible=True, **kwargs).double()
    _perturbed(net)
    first = next(i for i, b in enumerate(net.blocks) if isinstance(b, ReversibleBlock))
    blocks = next(run for run in net.blocks.runs() if isinstance(run[0], ReversibleBlock))[:2]
    with torch.no_grad():  # a realistic input of the run: what the layers before it give
        x = net.stem(torch.randn(*shape, dtype=torch.float64).flatten(1) if name == "highway_mlp"
                     else torch.randn(*shape, dtype=torch.float64))
        for b in list(net.blocks)[:first]:
            x = b(x)
    x.requires_grad_(True)
    fast = name != "highway_mlp"  # conv nets: random projections of the Jacobian (torch's fast mode)
    assert torch.autograd.gradcheck(lambda x: reversible_run(blocks, x), (x,), eps=1e-6, atol=1e-5, rtol=1e-4,
                                    fast_mode=fast)

    params = [p for b in blocks for p in b.parameters()]
    w = torch.randn_like(reversible_run(blocks, x))  # loss = <w, run(x)>
    for p in params:
        p.grad = None
    (reversible_run(blocks, x) * w).sum().backward()
    v = [torch.randn_like(p) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, v, strict=True)).item()

    def loss_along(step: float) -> float:
        with torch.no_grad():
            for p, d in zip(params, v, strict=True):
                p.add_(step * d)
            value = (reversible_run(blocks, x) * w).sum().item()
            for p, d in zip(params, v, strict=True):
                p.sub_(step * d)
        return value

    eps = 1e-6
    numeric = (loss_along(eps) - loss_along(-eps)) / (2 * eps)
    assert abs(analytic - numeric) <= 1e-5 + 1e-5 * abs(numeric), (analytic, numeric)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("name, kwargs, shape", BODIES)
def test_same_outputs_gradients_and_running_stats_as_stored_activations(name, kwargs, shape, gate, dtype, tol):
    """float64: the same gradients as autograd with stored activations; float32: what the rounding
    of the reconstruction costs (perturbed weights, so the gates are not at their init)."""
    torch.manual_seed(0)
    net = create_model(name, gate=gate, reversible=True, **kwargs).to(dtype)
    _perturbed(net)
    stored = copy.deepcopy(net)
    stored.blocks.store_activations = True
    assert list(net.state_dict()) == list(stored.state_dict())
    x = torch.randn(*shape, dtype=dtype)
    grads = []
    outs = []
    for model in (net, stored):
        out = model(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.equal(outs[0], outs[1])  # the forward is the same computation
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < tol
    for (n, a), b in zip(net.state_dict().items(), stored.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{n}: the recomputation in backward must not update batch-norm statistics"


def test_the_run_keeps_only_its_output():
    """Autograd saves nothing inside the reversible run: the saved tensors of the graph are the
    stem's and head's and one per run, whatever the depth."""

    def saved_bytes(depth: int) -> int:
        net = create_model("highway_mlp", depth=depth, width=16, in_features=8, reversible=True)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(torch.randn(32, 8)).sum()
        return total

    assert saved_bytes(401) == saved_bytes(11)


def test_inverse_reconstructs_the_input():
    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=51, width=8, in_features=8, gate="gated", reversible=True).double()
    _perturbed(net)
    x = torch.randn(4, 8, dtype=torch.float64)
    with torch.no_grad():
        y = net.blocks(x)
    assert torch.allclose(net.blocks.inverse(y), x, atol=1e-10)


def test_bf16_autocast_trains_and_keeps_the_stream_in_float32():
    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=20, width=8, in_features=8, reversible=True)
    ref = copy.deepcopy(net)
    ref.blocks.store_activations = True
    x, y = torch.randn(16, 8), torch.randint(0, 10, (16,))
    grads = []
    for model in (net, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 rounding differs between the two paths only through recomputation order: close, not equal
    assert ((grads[0] - grads[1]).norm() / grads[1].norm()).item() < 2e-2


def test_compiled_couplings_give_the_same_gradients():
    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=5, width=8, in_features=8, reversible=True)
    ref = copy.deepcopy(net)
    for block in net.blocks:
        block.compile(backend="aot_eager")
    x = torch.randn(4, 8)
    for model in (net, ref):
        model(x).square().sum().backward()
    for (n, a), b in zip(net.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), n


@pytest.mark.parametrize("kwargs, match", [
    ({"gate": "plain"}, "carry path to invert"),
    ({"width": 7}, "even width"),
])
def test_refusals_name_the_problem_and_the_fix(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_model("highway_mlp", **{"depth": 4, "width": 8, **kwargs}, reversible=True)


def test_checkpointing_a_reversible_stack_is_refused():
    from deepres.parallelize.activation_checkpoint import apply_activation_checkpointing

    net = create_model("highway_mlp", depth=4, width=8, in_features=4, reversible=True)
    assert isinstance(net.blocks, ReversibleStack)
    with pytest.raises(ConfigError, match="Use one of the two"):
        apply_activation_checkpointing(net, 2)


def test_shape_changing_blocks_store_as_usual():
    net = create_model("cifar_resnet", depth=14, reversible=True)
    runs = [len(r) for r in net.blocks.runs()]
    kinds = [isinstance(r[0], ReversibleBlock) for r in net.blocks.runs()]
    assert runs == [2, 1, 1, 1, 1] and kinds == [True, False, True, False, True]


def test_diagnostics_see_the_gates_activations_error_flow_and_flops():
    """The depth diagnostics measure a reversible net as they measure the same net storing its
    activations: per-block gates and activations, the error-flow ratio, the FLOPs of one step."""
    from deepres.observability.depth_probe import Probe, find_gates
    from deepres.observability.perf_monitor import count_training_flops

    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=9, width=8, in_features=8, gate="gated", reversible=True)
    stored = copy.deepcopy(net)
    stored.blocks.store_activations = True
    x = torch.randn(16, 8)
    results = []
    for model in (net, stored):
        gates = find_gates(model.blocks)
        assert sorted(role for role, _ in gates) == ["carry"] * 16 + ["transform"] * 16  # 2 couplings x 8 blocks
        probe = Probe(model.blocks, gates)
        out = model(x)
        probe.remove()  # as the callback does before backward
        out.square().sum().backward()
        arrays = probe.collect()
        results.append((arrays, probe.error_flow_ratio()))
    (a, ratio), (b, ratio_stored) = results
    assert set(a) == {"act_rms", "gate/carry", "gate/transform"}
    for key in a:
        assert a[key].shape == (8,) and torch.allclose(torch.tensor(a[key]), torch.tensor(b[key]))
    assert ratio == pytest.approx(ratio_stored, rel=1e-5) and ratio > 0
    assert count_training_flops(net, x) == count_training_flops(stored, x) > 0
    assert net.blocks.store_activations is False  # the count leaves the setting as it was


def test_autograd_grad_for_the_input_leaves_parameter_gradients_alone():
    """Only loss.backward() accumulates the run's parameter gradients: torch.autograd.grad for the input
    (error flow, memory probes) gets the same input gradient as backward and writes no .grad."""
    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=12, width=16, in_features=8, reversible=True)
    x = torch.randn(4, 8, requires_grad=True)
    (gx,) = torch.autograd.grad(net(x).sum(), [x])
    assert all(p.grad is None for p in net.parameters())
    net(x).sum().backward()
    assert torch.allclose(x.grad, gx)
    assert all(p.grad is not None for p in net.blocks.parameters())


def test_ddp_that_searches_for_unused_parameters_is_refused_for_reversible_nets():
    """DDP's find_unused_parameters=True would reduce a reversible run's parameters as unused: the
    launching process refuses it and names the plain ddp strategy instead."""
    from deepres.strategies import resolve_strategy
    from deepres.training import Classifier

    trainer = {"strategy": "ddp_find_unused_parameters_true", "accelerator": "cpu", "devices": 2}
    with pytest.raises(ConfigError, match="Use --trainer.strategy ddp with reversible blocks"):
        resolve_strategy(trainer, model=Classifier(depth=4, width=8, reversible=True))
    assert resolve_strategy(trainer, model=Classifier(depth=4, width=8)) == "ddp_find_unused_parameters_true"
    assert resolve_strategy({**trainer, "strategy": "ddp"}, model=Classifier(depth=4, width=8, reversible=True))
