"""`trainer.strategy: pipeline`: the cut, the checkpoint layout, the refusals, and real runs on 2 and 4 CPU
processes with gloo against one-process references.

The real runs start tests/_pipe.py once per rank (as torchrun would); one run goes through `deepres fit`
and Lightning's own launcher. A deepres Classifier (a 6-block highway MLP, or a 3-block BatchNorm ResNet)
trains on 80 fixed rows: 5 SGD steps with momentum a epoch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import _pipe
import procs
import pytest
import torch
import torch.nn.functional as F

from deepres.errors import ConfigError
from deepres.models import create_model, list_models
from deepres.models.contract import is_deep_net
from deepres.pipeline.runtime import Pipeline, bubble_fraction, layout_for
from deepres.pipeline.split import Layout, block_ranges, partition
from deepres.pipeline.state import merge_optimizer_states, named_optimizer_state
from deepres.strategies import PipelineStrategy, resolve_strategy
from deepres.training import Classifier
from deepres.training.checkpoints import load_module

SCRIPT = Path(__file__).with_name("_pipe.py")
REPO = SCRIPT.parent.parent
TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------------------
# The cut (no processes)
# ---------------------------------------------------------------------------------------------------------
def test_partition_minimises_the_largest_stage_and_keeps_every_stage_non_empty():
    assert partition([1, 1, 1, 1, 1, 1], 2) == [(0, 3), (3, 6)]
    assert partition([4, 1, 1, 1, 1], 2) == [(0, 1), (1, 5)]  # 4 | 4, not 5 | 3
    assert partition([1, 1, 1, 9], 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    ranges = partition([1.0] * 10_000, 8)
    assert [e - s for s, e in ranges] == [1250] * 8
    with pytest.raises(ValueError):
        partition([1, 1], 3)


def test_layouts_put_stages_where_the_schedules_expect_them():
    assert Layout(2).stages_of(0) == [0] and Layout(2).stages_of(1) == [1]
    assert Layout(2, 2, "loop").stages_of(0) == [0, 2] and Layout(2, 2, "loop").stages_of(1) == [1, 3]
    assert Layout(2, 2, "v").stages_of(0) == [0, 3]
    assert layout_for("interleaved_1f1b", 4, 3).num_stages == 12
    assert layout_for("1f1b", 4, 3).num_stages == 4
    assert bubble_fraction(8, 32) == pytest.approx(7 / 39)  # 18 %


@pytest.mark.parametrize("arch", ["highway_mlp", "highway_cnn_cifar", "cifar_resnet", "resnet18", "lstm", "depth_lstm"])
def test_entry_blocks_exit_is_the_nets_own_forward(arch):
    """The stage boundaries deepres cuts at compose back into the model's forward for every model family."""
    assert arch in list_models()
    torch.manual_seed(0)
    small = {"highway_mlp": dict(depth=4, width=8, in_features=12), "highway_cnn_cifar": {},
             "cifar_resnet": dict(depth=8), "resnet18": {}, "lstm": dict(hidden_size=8, input_size=2),
             "depth_lstm": dict(depth=4, width=8, in_features=12)}[arch]
    net = create_model(arch, **small).eval()
    x = {"highway_mlp": torch.randn(3, 12), "lstm": torch.randn(3, 5, 2),
         "depth_lstm": torch.randn(3, 12)}.get(arch, torch.randn(3, 3, 32, 32))
    assert is_deep_net(net)
    with torch.no_grad():
        assert torch.allclose(net.exit(net.blocks(net.entry(x))), net(x), atol=1e-6)


def test_balance_by_parameters_by_time_and_by_hand():
    net = create_model("cifar_resnet", depth=20)  # 9 blocks: 16, 32 and 64 channels
    by_params = block_ranges(net, 3, "params")
    assert by_params[-1][1] - by_params[-1][0] < 3  # the wide blocks hold most parameters
    assert block_ranges(net, 3, [4, 4, 1]) == [(0, 4), (4, 8), (8, 9)]
    by_time = block_ranges(net, 2, "time", sample=torch.randn(2, 3, 32, 32))
    assert by_time[0][0] == 0 and by_time[-1][1] == 9 and len(by_time) == 2
    with pytest.raises(ConfigError, match="add up to the net's 9 blocks"):
        block_ranges(net, 3, [4, 4, 2])


def test_cut_keeps_only_this_ranks_stages():
    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=7, width=8, in_features=12)
    pipe = Pipeline.cut(net, ranges=[(0, 3), (3, 6)], layout=Layout(2), pp_rank=1, microbatches=2, schedule="1f1b")
    names = {n for n, _ in net.named_parameters()}
    assert names and all(n.startswith(("blocks.3", "blocks.4", "blocks.5", "head")) for n in names)
    assert pipe.has_last and not pipe.has_first
    with pytest.raises(RuntimeError, match="block 0 runs on another pipeline stage"):
        net.blocks[0](torch.randn(2, 8))


def test_optimizer_states_merge_into_the_one_device_layout():
    """Two stages' SGD states, merged, are the state dict one optimizer over the whole net has."""
    torch.manual_seed(0)
    model = Classifier(arch="highway_mlp", depth=5, width=8, input_shape=(6,), num_classes=3)
    whole = model.net
    groups = [[p for p in whole.parameters() if p.ndim > 1], [p for p in whole.parameters() if p.ndim <= 1]]
    one = torch.optim.SGD([{"params": g} for g in groups], lr=0.1, momentum=0.9)
    for p in whole.parameters():
        p.grad = torch.randn_like(p)
    one.step()
    names = {id(p): n for n, p in whole.named_parameters()}
    order = [n for n, _ in whole.named_parameters()]
    halves = []
    for stage in (0, 1):  # the same tensors split as two stages would hold them
        mine = [[p for p in g if (names[id(p)].startswith(("stem", "blocks.0", "blocks.1"))) == (stage == 0)]
                for g in groups]
        opt = torch.optim.SGD([{"params": g} for g in mine], lr=0.1, momentum=0.9)
        opt.load_state_dict({"state": {i: one.state[p] for i, p in enumerate(p for g in mine for p in g)},
                             "param_groups": [{**one.param_groups[0], "params": list(range(len(mine[0])))},
                                              {**one.param_groups[1], "params": list(range(len(mine[0]),
                                                                                           len(mine[0]) + len(mine[1])))}]})
        halves.append(named_optimizer_state(opt, names))
    merged = merge_optimizer_states(halves, order)
    expected = one.state_dict()
    assert [g["params"] for g in merged["param_groups"]] == [g["params"] for g in expected["param_groups"]]
    assert merged["state"].keys() == expected["state"].keys()
    for i, state in expected["state"].items():
        assert torch.equal(merged["state"][i]["momentum_buffer"], state["momentum_buffer"])


# ---------------------------------------------------------------------------------------------------------
# Refusals, before any process starts
# ---------------------------------------------------------------------------------------------------------
def _pipeline(**options: Any) -> PipelineStrategy:
    return PipelineStrategy(**options)


@pytest.mark.parametrize(("trainer", "batch_size", "model_depth", "message"), [
    ({"devices": 2, "strategy": _pipeline(stages=2)}, 16, 2, "2 stages, but the net has only 1 blocks"),
    ({"devices": 2, "strategy": _pipeline(schedule="interleaved_1f1b", microbatches=4)}, 16, 4,
     "4 stages, but the net has only 3 blocks"),
    ({"devices": 2, "strategy": _pipeline(microbatches=3)}, 16, 7, "microbatches=3 does not divide the per-replica"),
    ({"devices": 3, "strategy": _pipeline(stages=2)}, 16, 7, "2 stages on 3 processes: the processes must be a multiple"),
    ({"devices": 2, "num_nodes": 3, "strategy": _pipeline(stages=4)}, 16, 7, "4 stages on 6 processes"),
    ({"devices": 2, "strategy": _pipeline(microbatches=4), "accumulate_grad_batches": 2}, 16, 7,
     "micro-batches are gradient accumulation already"),
    ({"devices": 2, "strategy": _pipeline(microbatches=4), "precision": "16-true"}, 16, 7, "float16 needs a loss scaler"),
    ({"devices": 4, "strategy": _pipeline(microbatches=2, schedule="1f1b")}, 16, 7, "need at least one micro-batch per"),
])
def test_pipeline_refusals_name_the_problem_and_the_fix(trainer, batch_size, model_depth, message):
    model = Classifier(arch="highway_mlp", depth=model_depth, width=4, input_shape=(6,))
    with pytest.raises(ConfigError, match=message):
        resolve_strategy({"accelerator": "cpu", **trainer}, batch_size=batch_size, model=model)


def test_bad_options_are_refused_when_the_strategy_is_built():
    with pytest.raises(ConfigError, match="schedule 'zb': choose one of gpipe, 1f1b"):
        PipelineStrategy(schedule="zb")
    with pytest.raises(ConfigError, match="balance 'flops'"):
        PipelineStrategy(balance="flops")


def test_pipeline_with_deepspeed_is_refused_with_the_pipeline_strategy_named():
    """DeepSpeed's own pipeline engine (a `pipeline` section in its JSON) cannot run under Lightning."""
    from deepres.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy(stage=2, config={"pipeline": {"stages": 2}})
    with pytest.raises(ConfigError, match="use --trainer.strategy pipeline"):
        resolve_strategy({"accelerator": "cpu", "devices": 2, "strategy": strategy}, batch_size=8)


def test_the_name_pipeline_resolves_and_a_good_combination_passes():
    model = Classifier(arch="highway_mlp", depth=9, width=4, input_shape=(6,))
    strategy = resolve_strategy({"accelerator": "cpu", "devices": 4, "strategy": "pipeline"}, batch_size=16, model=model)
    assert isinstance(strategy, PipelineStrategy) and strategy.batch_size == 16
    two_by_two = resolve_strategy({"accelerator": "cpu", "devices": 2, "num_nodes": 2,
                                   "strategy": _pipeline(stages=2, microbatches=4)}, batch_size=16, model=model)
    assert two_by_two.stages == 2


def test_a_refused_run_exits_before_any_process_starts(tmp_path):
    done = procs.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--devices", "2", "--stages", "2",
                      "--microbatches", "3"], 120, env=_env())
    assert done.returncode == 2, done.stderr
    assert "does not divide the per-replica batch" in done.stderr
    assert "Traceback" not in done.stderr and "Initializing distributed" not in done.stderr + done.stdout


# ---------------------------------------------------------------------------------------------------------
# Real runs
# ---------------------------------------------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), WANDB_MODE="disabled")
    return env


def run(out: Path, *args: str, processes: int = 2) -> dict[str, Any]:
    command = [sys.executable, str(SCRIPT), "--out", str(out), *args]
    if processes == 1:
        done = procs.run(command, 300, env=_env(), cwd=out.parent)
    else:
        done = procs.run_ranks(command, processes, 300, _env(), out.parent, out / "logs")
    assert done.returncode == 0, done.stderr[-6000:]
    return json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}


def weights(path: Path, floats_only: bool = False) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k: v.float() for k, v in state.items() if not floats_only or v.is_floating_point()}


def difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Path]:
    """The references: one process on the global batch of 16, for 1 and for 2 epochs (5 and 10 SGD steps)."""
    found = {}
    for epochs in (1, 2):
        out = tmp_path_factory.mktemp(f"one-process-{epochs}")
        result = run(out, "--strategy", "auto", "--devices", "1", "--batch-size", "16", "--epochs", str(epochs),
                     processes=1)
        assert result["global_step"] == 5 * epochs
        found[epochs] = out / "last.ckpt"
    return found


@pytest.fixture(scope="module")
def gpipe_two_stages(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpipe-2")
    result = run(out, "--devices", "2", "--schedule", "gpipe", "--microbatches", "4", "--batch-size", "16")
    assert result["world_size"] == 2 and result["global_step"] == 5 and result["ranges"] == [[0, 3], [3, 6]]
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_gpipe_two_stages_takes_the_steps_of_one_process(gpipe_two_stages, one_process):
    pipe = weights(gpipe_two_stages / "last.ckpt")
    assert difference(pipe, weights(one_process[1])) < TOLERANCE
    assert difference(pipe, {f"net.{k}": v for k, v in _pipe.make_model("mlp").net.state_dict().items()}) > 1e-2


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("schedule", "processes", "stages", "batch"), [
    ("1f1b", 2, 2, 16), ("gpipe", 4, 2, 8), ("1f1b", 4, 2, 8), ("interleaved_1f1b", 2, 2, 16),
    ("zero_bubble", 2, 2, 16),
])
def test_schedules_and_replicas_take_the_steps_of_one_process(tmp_path, one_process, schedule, processes, stages,
                                                               batch):
    """2 stages, and 2 stages x 2 replicas (each replica half of the global batch of 16)."""
    result = run(tmp_path, "--devices", str(processes), "--stages", str(stages), "--schedule", schedule,
                 "--microbatches", "4", "--batch-size", str(batch), processes=processes)
    assert result["world_size"] == processes and result["global_step"] == 5
    assert difference(weights(tmp_path / "last.ckpt"), weights(one_process[1])) < TOLERANCE


@pytest.mark.slow
@pytest.mark.distributed
def test_mhc_takes_the_steps_of_one_process_under_ddp_and_across_two_pipeline_stages(tmp_path):
    """Multi-stream blocks (mHC, 3 streams, per-sample Sinkhorn mixings) after 5 SGD steps on the global
    batch of 16: one process without Lightning, 2 DDP processes on 8 rows each, and 2 pipeline stages
    handing the (B, C, n) streams across the boundary in 4 micro-batches. The only differences are float32
    rounding: the gradient sums over the rows in another order (per rank, per micro-batch), as for the
    one-stream net, and TOLERANCE holds them with room while the 5 steps move the weights by > 1e-2."""
    (tmp_path / "one").mkdir()  # the one process is this one: no start-up to pay for
    _pipe.reference(_pipe.parse(["--out", str(tmp_path / "one"), "--net", "mhc", "--microbatches", "1"]))
    one = weights(tmp_path / "one" / "reference.ckpt")
    ddp = run(tmp_path / "ddp", "--net", "mhc", "--strategy", "ddp", "--devices", "2", "--batch-size", "8")
    pipe = run(tmp_path / "pipe", "--net", "mhc", "--devices", "2", "--schedule", "gpipe", "--microbatches", "4")
    assert ddp["world_size"] == pipe["world_size"] == 2 and ddp["global_step"] == pipe["global_step"] == 5
    assert pipe["ranges"] == [[0, 3], [3, 6]]
    assert difference(weights(tmp_path / "ddp" / "last.ckpt"), one) < TOLERANCE
    assert difference(weights(tmp_path / "pipe" / "last.ckpt"), one) < TOLERANCE
    assert difference(one, {f"net.{k}": v for k, v in _pipe.make_model("mhc").net.state_dict().items()}) > 1e-2


@pytest.mark.slow
@pytest.mark.distributed
def test_clipping_uses_the_norm_over_all_stages_also_with_activation_checkpointing(tmp_path):
    reference = tmp_path / "one"
    reference.mkdir()
    run(reference, "--strategy", "auto", "--devices", "1", "--clip", "0.05", processes=1)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    run(pipe, "--devices", "2", "--microbatches", "4", "--clip", "0.05", "--checkpointing", "2")
    assert difference(weights(pipe / "last.ckpt"), weights(reference / "last.ckpt")) < TOLERANCE


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("replicas", [1, 2])
def test_batchnorm_normalises_each_micro_batch_as_gpipe_does(tmp_path, replicas):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    run(pipe, "--net", "bn", "--devices", str(2 * replicas), "--stages", "2", "--schedule", "gpipe",
        "--microbatches", "4", "--batch-size", str(16 // replicas), processes=2 * replicas)
    for micro in (4, 1):
        out = tmp_path / f"reference-{micro}"
        out.mkdir()
        run(out, "--reference", "--net", "bn", "--replicas", str(replicas), "--microbatches", str(micro),
            "--batch-size", str(16 // replicas), processes=1)
    got = weights(pipe / "last.ckpt")
    assert difference(got, weights(tmp_path / "reference-4" / "reference.ckpt")) < TOLERANCE  # statistics included
    floats = {k: v for k, v in got.items() if "num_batches" not in k}
    whole_batch = {k: v for k, v in weights(tmp_path / "reference-1" / "reference.ckpt").items() if k in floats}
    assert difference(floats, whole_batch) > 1e-3  # per micro-batch is not per batch


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_from_last_ckpt_is_exact(tmp_path, gpipe_two_stages, one_process):
    """Weights, momentum and the position in the data come back: the resumed 1F1B run ends where one process
    does after 10 steps (also across schedules: the checkpoint has the one-device layout)."""
    result = run(tmp_path, "--devices", "2", "--schedule", "1f1b", "--microbatches", "4", "--epochs", "2",
                 "--resume", str(gpipe_two_stages / "last.ckpt"))
    assert result["global_step"] == 10
    assert difference(weights(tmp_path / "last.ckpt"), weights(one_process[2])) < TOLERANCE


@pytest.mark.slow
@pytest.mark.distributed
def test_last_ckpt_is_one_file_that_loads_on_one_device_with_the_same_outputs(gpipe_two_stages):
    checkpoint = gpipe_two_stages / "last.ckpt"
    assert checkpoint.is_file()
    model = load_module(Classifier, checkpoint).eval()
    data = _pipe.FixedData(16, _pipe.NETS["mlp"]["input_shape"])
    data.setup()
    x, y = data.val_set.tensors
    with torch.no_grad():
        one_device = F.cross_entropy(model(x), y).item()
    # the pipeline's own validation (forward-only schedule, the last batch padded) measured the same loss
    pipeline = json.loads((gpipe_two_stages / "result.json").read_text())["val_loss"]
    assert one_device == pytest.approx(pipeline, abs=TOLERANCE)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    names = [n for g in saved["optimizer_states"][0]["param_groups"] for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_mixed_trains_under_the_pipeline(tmp_path, gpipe_two_stages):
    result = run(tmp_path, "--devices", "2", "--microbatches", "4", "--precision", "bf16-mixed")
    fp32 = json.loads((gpipe_two_stages / "result.json").read_text())["losses"]
    assert all(math.isfinite(v) for v in result["losses"])
    assert result["losses"] == pytest.approx(fp32, abs=5e-2)


@pytest.mark.slow
@pytest.mark.distributed
def test_deepres_fit_with_the_lightning_launcher_logs_depth_across_stages(tmp_path):
    """`deepres fit --trainer.devices 2`: Lightning starts rank 1; rank 0 writes the run directory with every
    block's gradient norm and the error-flow ratio from block 0 (stage 0) to the last block (stage 1)."""
    args = ["-m", "deepres", "fit", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "deepres.strategies.PipelineStrategy", "--trainer.strategy.schedule", "1f1b",
            "--trainer.strategy.microbatches", "4", "--trainer.strategy.balance", "params",
            "--model.depth", "9", "--model.width", "16", "--data.batch_size", "32", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "4", "--diagnostics.every_n_steps", "2", "--run.name", "pp",
            "--trainer.log_every_n_steps", "2",
            "--trainer.enable_progress_bar", "false"]
    done = procs.run([sys.executable, *args], 300, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = tmp_path / "runs" / "pp"
    records = [json.loads(line) for line in (run_dir / "depth.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2]
    for record in records:
        assert len(record["grad_norm"]) == 8 and all(v is not None and v > 0 for v in record["grad_norm"])
        assert 0.05 < record["error_flow_ratio"] < 20
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "train/loss" in header and "val/acc1" in header
    model = load_module(Classifier, run_dir / "checkpoints" / "last.ckpt")
    assert len(model.net.blocks) == 8


def test_submit_renders_two_nodes_of_two_tasks_for_two_stages_times_two_replicas(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "deepres", "submit", "--nodes", "2", "--tasks-per-node", "2", "--time", "10",
         "--dry-run", "--trainer.accelerator", "cpu", "--trainer.strategy", "deepres.strategies.PipelineStrategy",
         "--trainer.strategy.stages", "2", "--trainer.strategy.microbatches", "4", "--data.batch_size", "32"],
        env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "#SBATCH --nodes=2" in done.stdout and "#SBATCH --ntasks-per-node=2" in done.stdout
    assert "--trainer.strategy.stages 2" in done.stdout and "--trainer.num_nodes 2" in done.stdout
    subprocess.run(["bash", "-n"], input=done.stdout, text=True, check=True)
