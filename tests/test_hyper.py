"""Multi-stream residuals (deepres.models.hyper): hc, mhc and mhc_lite, their one-stream reductions,
the doubly stochastic constraints, exact gradients, the composite-gain diagnostic and refusals."""

import csv
import json
import math

import pytest
import torch
from torch import nn

from deepres.errors import ConfigError
from deepres.models import create_model
from deepres.models.blocks import ResidualBlock, dense_gate
from deepres.models.bodies import PreActDenseBody
from deepres.models.hyper import (
    HyperBlock,
    StreamMixing,
    composite_gain,
    matrix_product,
    permutation_matrices,
    permutation_mixture,
    residual_matrices,
    sinkhorn,
)
from deepres.observability.diagnostics import DEPTH_FILE
from deepres.observability.report import render
from deepres.pipeline.split import block_ranges
from deepres.training.cli import main
from deepres.training.run_dir import resolve_run_dir

KINDS = ("hc", "mhc", "mhc_lite")


def _perturb_(module: nn.Module, scale: float = 0.5, seed: int = 0) -> None:
    """Move every parameter off its init, so that nothing below holds only because of it."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _sinkhorn_reference(logits, iters):
    log_m = logits
    for _ in range(iters):
        log_m = log_m.log_softmax(-1).log_softmax(-2)
    return log_m.exp()


# ---------------------------------------------------------------- doubly stochastic matrices
def test_sinkhorn_output_is_doubly_stochastic():
    logits = 2.0 * torch.randn(16, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    m = sinkhorn(logits, 20)
    assert (m > 0).all()
    assert torch.allclose(m.sum(-2), torch.ones(16, 4, dtype=torch.float64), atol=1e-12)  # columns last: exact
    # rows: within what t_max = 20 leaves on logits this spread (1.4 % here, the gap mHC-lite points at);
    # more iterations close it, so it is the finite t_max that leaves it, not the implementation
    row_gap = lambda k: (sinkhorn(logits, k).sum(-1) - 1).abs().max().item()  # noqa: E731
    assert 1e-3 < row_gap(20) < 0.03
    assert row_gap(100) < row_gap(20) / 100 and row_gap(500) < 1e-12


def test_sinkhorn_equals_the_plain_iterations_and_their_gradient():
    logits = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 3, 3, dtype=torch.float64)
    ours, ref = sinkhorn(logits, 7), _sinkhorn_reference(logits, 7)
    assert torch.allclose(ours, ref, atol=1e-14)
    g_ours, = torch.autograd.grad((ours * weights).sum(), logits)
    g_ref, = torch.autograd.grad((ref * weights).sum(), logits)
    assert torch.allclose(g_ours, g_ref, atol=1e-13)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 20), (logits,))


def test_permutation_mixture_is_exactly_doubly_stochastic():
    perms = permutation_matrices(4)
    assert perms.shape == (24, 4, 4) and torch.equal(perms[0], torch.eye(4))
    assert len({tuple(p.flatten().tolist()) for p in perms}) == 24
    m = permutation_mixture(3.0 * torch.randn(10, 24), perms)
    assert (m >= 0).all()
    assert (m.sum(-1) - 1).abs().max() < 1e-6 and (m.sum(-2) - 1).abs().max() < 1e-6


@pytest.mark.parametrize("depth", [10, 1000])
def test_mhc_lite_composite_stays_doubly_stochastic_at_any_depth(depth):
    net = create_model("highway_mlp", depth=depth + 1, width=8, in_features=4, gate="mhc_lite", dynamic=False)
    _perturb_(net, scale=2.0)
    gain = composite_gain(residual_matrices(net.blocks))
    assert len(gain.block_max_row_sum) == depth
    for value in (gain.composite_max_row_sum, gain.composite_max_col_sum, gain.composite_min_col_sum):
        assert abs(value - 1.0) < 1e-5
    assert gain.composite_max_abs_log_col_sum < 1e-5


def test_streams_become_different_under_training():
    """The stem's n copies are identical; the asymmetric initial read (H^pre) makes them differ under
    training. With the same H^pre on every stream they would stay exactly equal for good."""
    def divergence(kind, symmetric):
        torch.manual_seed(0)
        net = create_model("highway_mlp", depth=6, width=8, in_features=5, gate=kind, streams=3, gate_bias=0)
        if symmetric:
            for block in net.blocks:
                block.mixing.pre_bias.data.fill_(0.0)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        x, y = torch.randn(16, 5), torch.randint(0, 10, (16,))
        for _ in range(10):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        streams = net.blocks(net.stem(x))
        return ((streams[..., 0] - streams[..., 1]).abs().max() / streams.abs().max()).item()

    for kind in KINDS:
        assert divergence(kind, symmetric=False) > 1e-6, kind
    for kind in ("mhc", "mhc_lite"):
        assert divergence(kind, symmetric=True) == 0.0, kind


def test_dynamic_mixings_depend_on_the_sample_and_keep_their_constraints():
    torch.manual_seed(0)
    streams = torch.randn(6, 5, 4)
    for kind in ("mhc", "mhc_lite"):
        mixing = StreamMixing(kind, 4, 5, dynamic=True)
        _perturb_(mixing, scale=1.0)
        pre, post, res = mixing(streams)
        assert pre.shape == (6, 4) and post.shape == (6, 4) and res.shape == (6, 4, 4)
        assert (res[0] - res[1]).abs().max() > 1e-3  # per sample
        assert ((pre > 0) & (pre < 1)).all() and ((post > 0) & (post < 2)).all()
        assert (res.sum(-2) - 1).abs().max() < 1e-5


# ---------------------------------------------------------------- initialisation
def test_initialisations():
    hc = StreamMixing("hc", 4, 5, index=6, dynamic=True)
    pre, post, res = hc(torch.randn(2, 5, 4))
    assert torch.equal(pre, torch.tensor([[0.0, 0, 1, 0]] * 2))  # HC: block k reads stream k mod n
    assert torch.equal(post, torch.ones(2, 4)) and torch.equal(res, torch.eye(4).expand(2, 4, 4))
    eye_mix = 0.9 * torch.eye(4) + 0.025
    for kind in ("mhc", "mhc_lite"):
        mixing = StreamMixing(kind, 4, 5, index=5, dynamic=True, post_logit=-2.0)
        pre, post, res = mixing(torch.randn(3, 5, 4))
        assert torch.allclose(pre, torch.tensor([[0.1, 0.9, 0.1, 0.1]] * 3))
        assert torch.allclose(post, torch.full((3, 4), 2 * torch.sigmoid(torch.tensor(-2.0)).item()))
        assert torch.allclose(res, eye_mix.expand(3, 4, 4), atol=1e-6)
        assert torch.allclose(mixing.scale, torch.full((3,), 0.01))


# ---------------------------------------------------------------- n = 1: members of y = g(x)·x + t(x)·h(x)
class _ScaledInput(nn.Module):
    def __init__(self, scale, body):
        super().__init__()
        self.scale, self.body = scale, body

    def forward(self, x):
        return self.body(self.scale * x)


def _pinned_gated(body, carry, transform):
    block = ResidualBlock(body, "gated", transform_gate=dense_gate(6, 6, 0.0), carry_gate=dense_gate(6, 6, 0.0))
    block.carry_gate.pin(carry)
    block.transform_gate.pin(transform)
    return block


def test_one_stream_hc_is_the_gated_member_with_constant_gates():
    torch.manual_seed(0)
    body = PreActDenseBody(6, 6, zero_init=False)
    mixing = StreamMixing("hc", 1, 6, dynamic=False)
    with torch.no_grad():
        mixing.res_bias.fill_(0.7)   # carry g
        mixing.post_bias.fill_(1.3)  # transform t
        mixing.pre_bias.fill_(1.0)
    x = torch.randn(5, 6)
    y = HyperBlock(body, mixing)(x.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(y, _pinned_gated(body, 0.7, 1.3)(x), atol=1e-6)
    assert not torch.allclose(y, x + body(x), atol=1e-3)


@pytest.mark.parametrize("kind", ["mhc", "mhc_lite"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_one_stream_mhc_is_a_residual_block_with_a_transform_gate(kind, dynamic):
    """H^res of one stream is exactly 1 (the only 1×1 doubly stochastic matrix): carry 1, transform
    2σ(b_post), the body reading σ(b_pre)·x."""
    torch.manual_seed(0)
    body = PreActDenseBody(6, 6, zero_init=False)
    mixing = StreamMixing(kind, 1, 6, dynamic=dynamic)
    with torch.no_grad():
        mixing.pre_bias.fill_(-0.4)
        mixing.post_bias.fill_(0.8)
        mixing.res_bias.fill_(3.0)
    x = torch.randn(5, 6)
    assert torch.equal(mixing(x.unsqueeze(-1))[2], torch.ones_like(mixing(x.unsqueeze(-1))[2]))
    y = HyperBlock(body, mixing)(x.unsqueeze(-1)).squeeze(-1)
    pre, post = torch.sigmoid(torch.tensor(-0.4)).item(), 2 * torch.sigmoid(torch.tensor(0.8)).item()
    assert torch.allclose(y, _pinned_gated(_ScaledInput(pre, body), 1.0, post)(x), atol=1e-6)


def test_one_stream_models_with_the_papers_init_are_the_residual_model():
    """highway_mlp with one stream and gate_bias 0 (H^post = 1): the residual model's output, for the
    same stem, bodies and head, whatever those weights are."""
    torch.manual_seed(0)
    residual = create_model("highway_mlp", depth=6, width=8, in_features=5, gate="residual")
    _perturb_(residual)
    x = torch.randn(4, 5)
    for kind in KINDS:
        net = create_model("highway_mlp", depth=6, width=8, in_features=5, gate=kind, streams=1, gate_bias=0,
                           dynamic=False)
        shared = [p for name, p in net.named_parameters() if ".mixing." not in name]
        with torch.no_grad():
            for mine, theirs in zip(shared, residual.parameters(), strict=True):
                mine.copy_(theirs)
        # mhc's body reads σ(ln 9)·x = 0.9·x, which its LayerNorm returns as x up to its epsilon
        tol = 1e-6 if kind == "hc" else 1e-4
        assert torch.allclose(net(x), residual(x), rtol=tol, atol=tol), kind


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dynamic", [False, True])
def test_block_gradients_match_finite_differences_in_float64(kind, dynamic):
    torch.manual_seed(0)
    block = HyperBlock(PreActDenseBody(4, 4, zero_init=False),
                       StreamMixing(kind, 3, 4, dynamic=dynamic, sinkhorn_iters=5)).double()
    _perturb_(block, scale=0.3)
    names = [n for n, _ in block.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in block.parameters())
    streams = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)

    def run(h, *ps):
        return torch.func.functional_call(block, dict(zip(names, ps, strict=True)), (h,))

    assert torch.autograd.gradcheck(run, (streams, *params))


def _plain_block(block, h):
    """H^res H + H^post ⊗ body(Σ_j H^pre_j H_j), from StreamMixing's forward, autograd through every op."""
    batch, n = h.shape[0], h.shape[-1]
    pre, post, res = block.mixing(h)
    x = torch.einsum("b...j,bj->b...", h, pre.expand(batch, n))
    mixed = torch.einsum("b...j,bij->b...i", h, res.expand(batch, n, n))
    return mixed + block.body(x).unsqueeze(-1) * post.expand(batch, n).view(batch, *[1] * (h.ndim - 2), n)


@pytest.mark.parametrize("spatial", [(), (3, 2)])
def test_block_equals_the_plain_formulas_with_their_gradients(spatial):
    """A block computes its mixings, reads and writes in a few fused ops (on the streams laid out stream
    by stream in memory); here against the formulas as written, autograd through every step, float64."""
    torch.manual_seed(0)
    n, width = 3, 4
    for kind in KINDS:
        for dynamic in (False, True):
            body = nn.Sequential(nn.Tanh(), nn.Linear(width, width)) if not spatial else nn.Tanh()
            block = HyperBlock(body, StreamMixing(kind, n, width, dynamic=dynamic, sinkhorn_iters=4)).double()
            _perturb_(block, scale=0.3)
            streams = torch.randn(5, width, *spatial, n, dtype=torch.float64, requires_grad=True)

            weights = torch.randn(streams.shape, dtype=torch.float64)
            ours, ref = block(streams), _plain_block(block, streams)
            assert torch.allclose(ours, ref, atol=1e-12), (kind, dynamic)
            params = [streams, *block.parameters()]
            g_ours = torch.autograd.grad((ours * weights).sum(), params)
            g_ref = torch.autograd.grad((ref * weights).sum(), params)
            for a, b in zip(g_ours, g_ref, strict=True):
                assert torch.allclose(a, b, atol=1e-12), (kind, dynamic)


def test_float32_gradients_equal_a_float64_reference():
    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=12, width=6, in_features=5, gate="mhc", streams=4)
    _perturb_(net, scale=0.3)
    ref = create_model("highway_mlp", depth=12, width=6, in_features=5, gate="mhc", streams=4).double()
    ref.load_state_dict(net.state_dict())
    x, labels = torch.randn(8, 5), torch.randint(0, 10, (8,))
    nn.functional.cross_entropy(net(x), labels).backward()
    nn.functional.cross_entropy(ref(x.double()), labels).backward()
    for (name, p), q in zip(net.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad.double(), q.grad, rtol=1e-3, atol=1e-5), name


# ---------------------------------------------------------------- the composite-gain diagnostic
def test_composite_gain_against_a_direct_product():
    g = torch.Generator().manual_seed(3)
    mats = [torch.randn(3, 4, 4, generator=g, dtype=torch.float64) for _ in range(7)]
    direct = torch.eye(4, dtype=torch.float64).expand(3, 4, 4)
    for m in mats:
        direct = m @ direct  # H_L ⋯ H_1
    assert torch.allclose(matrix_product(torch.stack(mats)), direct, atol=1e-12)
    gain = composite_gain(mats)
    assert gain.composite_max_row_sum == pytest.approx(direct.abs().sum(-1).max().item(), rel=1e-12)
    assert gain.composite_max_col_sum == pytest.approx(direct.abs().sum(-2).max().item(), rel=1e-12)
    assert gain.composite_min_col_sum == pytest.approx(direct.sum(-2).min().item(), rel=1e-12)
    cols = direct.sum(-2)
    expected_log = math.inf if (cols <= 0).any() else cols.log().abs().max().item()
    assert gain.composite_max_abs_log_col_sum == pytest.approx(expected_log)
    for i, m in enumerate(mats):
        assert gain.block_max_row_sum[i] == pytest.approx(m.abs().sum(-1).max().item())
        assert gain.block_max_col_sum[i] == pytest.approx(m.abs().sum(-2).max().item())
    # a static (n, n) matrix among per-sample ones counts for every sample
    mixed = composite_gain([mats[0][0], mats[1]])
    assert mixed.composite_max_row_sum == pytest.approx((mats[1] @ mats[0][0]).abs().sum(-1).max().item())


def test_composite_gain_sees_attenuation_the_max_sum_hides():
    shrink = torch.tensor([[0.5, 0.0], [0.0, 1.0]])
    gain = composite_gain([shrink] * 3)
    assert gain.composite_max_col_sum == pytest.approx(1.0)
    assert gain.composite_min_col_sum == pytest.approx(0.125)
    assert gain.composite_max_abs_log_col_sum == pytest.approx(math.log(8))


def test_residual_matrices_of_dynamic_blocks_come_from_a_forward():
    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=5, width=6, in_features=3, gate="mhc")
    _perturb_(net)
    streams = net.stem(torch.randn(7, 3))
    mats = residual_matrices(net.blocks, streams)
    assert len(mats) == 4 and mats[0].shape == (7, 4, 4)
    expected = net.blocks[0].mixing(streams)[2]
    assert torch.allclose(mats[0], expected)
    with pytest.raises(ValueError, match="depend on the input"):
        residual_matrices(net.blocks)


# ---------------------------------------------------------------- the rest of the house
def test_refusals():
    with pytest.raises(ConfigError, match="reversible"):
        create_model("highway_mlp", depth=4, gate="mhc", reversible=True)
    with pytest.raises(ConfigError, match="streams"):
        create_model("highway_mlp", depth=4, gate="highway", streams=4)
    with pytest.raises(ConfigError, match="dynamic"):
        create_model("highway_cnn_cifar", gate="gated", dynamic=False)
    with pytest.raises(ConfigError, match="permutation"):
        create_model("highway_mlp", depth=4, gate="mhc_lite", streams=7)
    with pytest.raises(ConfigError, match="sinkhorn_iters"):
        create_model("highway_mlp", depth=4, gate="mhc", sinkhorn_iters=0)
    with pytest.raises(ConfigError, match="init"):
        create_model("highway_mlp", depth=4, gate="hc", init="rezero")


def test_drop_path_skips_the_body_of_a_dropped_sample():
    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=5, width=6, in_features=3, gate="mhc", dynamic=False, drop_path=0.5)
    assert [b.drop_rate for b in net.blocks] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    block = net.blocks[3]
    _perturb_(block)
    streams = torch.randn(64, 6, 4)
    pre, post, res = block.mixing()
    carried = nn.functional.linear(streams, res)
    kept = carried + block.body(streams @ pre).unsqueeze(-1) * post / 0.5
    out = block.train()(streams)
    dropped = torch.isclose(out, carried, atol=1e-6).flatten(1).all(1)
    assert 10 < dropped.sum() < 54
    assert torch.allclose(out[~dropped], kept[~dropped], atol=1e-5)
    assert torch.allclose(block.eval()(streams), carried + block.body(streams @ pre).unsqueeze(-1) * post, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_fit_trains_a_few_steps_and_records_the_composite_gain(tmp_path, kind):
    args = ["fit", "--run.root", str(tmp_path / "runs"), "--run.name", kind, "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
            "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--model.depth", "4",
            "--model.gate", kind, "--model.streams", "3", "--diagnostics.every_n_steps", "1"]
    assert main(args) == 0
    run = resolve_run_dir(tmp_path / "runs", kind, resuming=True)
    with open(run / "metrics.csv", newline="") as f:
        losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    records = [json.loads(line) for line in (run / DEPTH_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        assert len(r["hyper/max_row_sum"]) == 3  # one value per block
        if kind != "hc":  # doubly stochastic: the composite keeps every column sum at 1
            assert abs(r["hyper/composite/min_col_sum"] - 1) < 1e-5
            assert abs(r["hyper/composite/max_row_sum"] - 1) < 1e-3
        # the max absolute row sum is submultiplicative: the composite's is at most the blocks' product
        assert r["hyper/composite/max_row_sum"] <= math.prod(r["hyper/max_row_sum"]) * (1 + 1e-3)
    written, _ = render(run, tmp_path / "report")  # deepres report
    assert tmp_path / "report" / "composite_gain.png" in written


def test_conv_net_trains_on_streams_and_records_the_composite_gain(tmp_path):
    args = ["fit", "--run.root", str(tmp_path / "runs"), "--run.name", "cnn", "--trainer.enable_progress_bar",
            "false", "--trainer.enable_model_summary", "false", "--trainer.log_every_n_steps", "1",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--diagnostics.every_n_steps", "1",
            "--data", "deepres.data.SyntheticDataModule", "--data.image_size", "16", "--model.arch",
            "highway_cnn_cifar", "--model.gate", "mhc_lite", "--model.streams", "3",
            "--model.arch_args", "{widths: [4, 8], blocks_per_stage: [1, 2]}"]
    assert main(args) == 0
    run = resolve_run_dir(tmp_path / "runs", "cnn", resuming=True)
    records = [json.loads(line) for line in (run / DEPTH_FILE).read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["hyper/max_row_sum"][1] is None  # the transition between the stages mixes no streams
        assert all(v is not None for i, v in enumerate(r["hyper/max_row_sum"]) if i != 1)
        assert abs(r["hyper/composite/max_row_sum"] - 1) < 1e-5 and abs(r["hyper/composite/min_col_sum"] - 1) < 1e-5


def test_conv_streams_are_carried_through_the_stage_transitions():
    torch.manual_seed(0)
    net = create_model("highway_cnn_cifar", widths=[4, 8], blocks_per_stage=[1, 1], gate="mhc", streams=3)
    x = torch.randn(2, 3, 16, 16)
    streams = net.stem(x)
    assert streams.shape == (2, 4, 16, 16, 3)
    after = net.blocks[1](net.blocks[0](streams))  # a block, then the transition
    assert after.shape == (2, 8, 8, 8, 3)
    # the transition treats every stream alike: stream j of its output is the transition of stream j
    net.eval()
    one = net.blocks[1].module(net.blocks[0](streams)[..., 2])
    assert torch.allclose(net.blocks[1](net.blocks[0](streams))[..., 2], one, atol=1e-6)
    assert net(x).shape == (2, 10)


@pytest.mark.parametrize("kind", KINDS)
def test_activation_checkpointing_gives_the_same_gradients(kind):
    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=8, width=6, in_features=5, gate=kind, streams=3)
    _perturb_(net, scale=0.3)
    x, y = torch.randn(4, 5), torch.randint(0, 10, (4,))

    def grads(every):
        net.zero_grad()
        net.blocks.checkpoint_every = every
        nn.functional.cross_entropy(net(x), y).backward()
        return [p.grad.clone() for p in net.parameters()]

    for plain, checkpointed in zip(grads(0), grads(3), strict=True):
        assert torch.allclose(plain, checkpointed, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_autocast_trains_with_finite_doubly_stochastic_mixing(kind):
    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=6, width=8, in_features=5, gate=kind, streams=4)
    x, y = torch.randn(8, 5), torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(net(x).float(), y)
        mats = residual_matrices(net.blocks, net.stem(x))
    loss.backward()
    assert math.isfinite(loss.item()) and all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert all(m.dtype == torch.float32 for m in mats)  # the mixing stays out of bf16
    if kind != "hc":
        assert composite_gain(mats).composite_max_abs_log_col_sum < 1e-5


@pytest.mark.parametrize("arch", ["highway_mlp", "highway_cnn_cifar"])
def test_pipeline_stages_compose_back_into_the_nets_forward(arch):
    """Pipeline stages cut between blocks: what crosses a boundary is the (B, C, …, n) stream tensor."""
    torch.manual_seed(0)
    small = dict(depth=6, width=8, in_features=12) if arch == "highway_mlp" else dict(widths=[4, 8],
                                                                                     blocks_per_stage=[2, 2])
    net = create_model(arch, gate="mhc", streams=3, **small).eval()
    _perturb_(net, scale=0.1)
    x = torch.randn(3, 12) if arch == "highway_mlp" else torch.randn(3, 3, 16, 16)
    ranges = block_ranges(net, 2, "params")
    with torch.no_grad():
        h = net.entry(x)
        for start, stop in ranges:
            for block in net.blocks[start:stop]:
                h = block(h)
            assert h.shape[0] == 3 and h.shape[-1] == 3  # batch first, streams last, at every boundary
        assert torch.allclose(net.exit(h), net(x), atol=1e-6)
