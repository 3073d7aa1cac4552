"""Strategies from the Trainer config: DDP and DeepSpeed ZeRO on CPU processes (gloo), the config translation,
the refusals, and `deepres convert-zero`.

The multi-process tests run tests/_tiny.py as a real script, so Lightning starts the second rank the way it
does for a user's command. The first DeepSpeed run on a machine JIT-compiles one op (about 35 s on 2 cores);
`python scripts/tools/build_deepspeed_ops.py` does that ahead of time.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import procs
import pytest
import torch
from _tiny import TinyClassifier  # tests/ is on sys.path under pytest's default import mode
from lightning.pytorch.accelerators import MPSAccelerator
from lightning.pytorch.strategies import DDPStrategy, Strategy
from lightning.pytorch.strategies import DeepSpeedStrategy as LightningDeepSpeedStrategy

from deepres.errors import ConfigError
from deepres.strategies import (
    DeepSpeedStrategy,
    check_trainer_config,
    deepspeed_config_from_trainer,
    extension_cache_dir,
    resolve_strategy,
    use_persistent_extension_cache,
)
from deepres.training.checkpoints import checkpoint_global_step
from deepres.training.convert_zero import convert_zero_main

TINY = Path(__file__).with_name("_tiny.py")
REPO = TINY.parent.parent
TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------------------
# Names and objects -> strategy (no processes)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "stage", "offload_optimizer", "offload_param"),
    [
        ("deepspeed_stage_1", 1, False, False),
        ("deepspeed_stage_2", 2, False, False),
        ("deepspeed_stage_2_offload", 2, True, False),
        ("deepspeed_stage_3", 3, False, False),
        ("deepspeed_stage_3_offload", 3, True, True),
    ],
)
def test_lightning_deepspeed_names_resolve_to_deepres_strategy(name, stage, offload_optimizer, offload_param):
    strategy = resolve_strategy({"accelerator": "cpu", "devices": 2, "strategy": name}, batch_size=8)

    assert type(strategy) is DeepSpeedStrategy
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == stage
    assert ("offload_optimizer" in zero) == offload_optimizer
    assert ("offload_param" in zero) == offload_param
    assert strategy.config["train_micro_batch_size_per_gpu"] == 8
    # Lightning adds this one itself at setup and refuses a config that already has it.
    assert "gradient_accumulation_steps" not in strategy.config


def test_ddp_names_pass_through_and_lightning_picks_gloo_on_cpu_nccl_on_gpu():
    assert resolve_strategy({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}) == "ddp"
    assert resolve_strategy({"accelerator": "cpu", "strategy": "auto"}) == "auto"

    def backend(device: torch.device) -> str:
        return DDPStrategy(parallel_devices=[device])._get_process_group_backend()

    assert backend(torch.device("cpu")) == "gloo"
    assert backend(torch.device("cuda", 0)) == "nccl"


def test_off_cpu_the_strategy_is_lightnings_unchanged():
    # On any accelerator but the CPU, setup defers to Lightning, whose own check is what speaks here.
    strategy = DeepSpeedStrategy(accelerator=MPSAccelerator(), parallel_devices=[torch.device("mps")])

    with pytest.raises(RuntimeError, match="only supported on CUDA GPUs but `MPSAccelerator`"):
        strategy.setup_environment()


def _parse_deepspeed_yaml(init_args: str):
    """The `strategy:` section of a config file as the CLI's parser reads it: DeepSpeedStrategy with
    `init_args` (YAML lines indented under it); returns the parsed namespace and the parser."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--strategy", type=str | Strategy)
    indented = "".join(f"    {line}\n" for line in init_args.strip().splitlines())
    yaml = f"strategy:\n  class_path: deepres.strategies.DeepSpeedStrategy\n  init_args:\n{indented}"
    return parser.parse_string(yaml), parser


def test_strategy_from_yaml_class_path_with_init_args():
    config, parser = _parse_deepspeed_yaml("stage: 3\noffload_optimizer: true\noffload_parameters: true")
    strategy = parser.instantiate_classes(config).strategy
    resolved = resolve_strategy({"accelerator": "cpu", "strategy": strategy, "precision": "bf16-mixed"})

    assert resolved is strategy
    zero = resolved.config["zero_optimization"]
    assert (zero["stage"], zero["offload_optimizer"]["device"], zero["offload_param"]["device"]) == (3, "cpu", "cpu")
    assert resolved.config["bf16"] == {"enabled": True}


def test_ddp_options_under_deepspeed_are_refused_by_the_yaml_parser():
    with pytest.raises(Exception, match="Option 'find_unused_parameters' is not accepted"):
        _parse_deepspeed_yaml("stage: 2\nfind_unused_parameters: true")


def test_json_config_path_is_the_base_and_trainer_keys_are_added(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 4}))
    strategy = DeepSpeedStrategy(config=str(path))

    resolved = resolve_strategy(
        {"accelerator": "cpu", "strategy": strategy, "gradient_clip_val": 0.5, "precision": "bf16-mixed"},
        batch_size=8,
    )

    assert resolved.config == {
        "zero_optimization": {"stage": 3},
        "train_micro_batch_size_per_gpu": 4,  # the file's value wins
        "gradient_clipping": 0.5,
        "bf16": {"enabled": True},
    }


def test_the_clis_namespace_is_accepted_as_the_trainer_settings():
    from jsonargparse import Namespace

    strategy = resolve_strategy(Namespace(accelerator="cpu", devices=2, strategy="deepspeed_stage_3"), batch_size=4)

    assert strategy.config["zero_optimization"]["stage"] == 3
    assert strategy.config["train_micro_batch_size_per_gpu"] == 4


def test_resolving_twice_gives_the_same_config():
    trainer = {"accelerator": "cpu", "strategy": "deepspeed_stage_2", "gradient_clip_val": 1.0}
    strategy = resolve_strategy(trainer, batch_size=8)
    first = dict(strategy.config)

    assert resolve_strategy({**trainer, "strategy": strategy}, batch_size=8).config == first


# ---------------------------------------------------------------------------------------------------------
# The translation, option by option
# ---------------------------------------------------------------------------------------------------------

ZERO_2 = {"zero_optimization": {"stage": 2}}


def test_translation_defaults_are_fp32_no_clipping_no_accumulation():
    config = deepspeed_config_from_trainer(ZERO_2)

    assert config == {**ZERO_2, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0}


@pytest.mark.parametrize(
    ("precision", "section"),
    [("32-true", None), ("bf16-mixed", "bf16"), ("bf16-true", "bf16"), ("16-mixed", "fp16"), ("16-true", "fp16")],
)
def test_translation_precision(precision, section):
    config = deepspeed_config_from_trainer(ZERO_2, precision=precision)

    assert {key for key in ("fp16", "bf16") if key in config} == ({section} if section else set())
    if section:
        assert config[section]["enabled"] is True


def test_translation_fp16_loss_scaling_defaults_and_overrides():
    default = deepspeed_config_from_trainer(ZERO_2, precision="16-mixed")["fp16"]
    custom = deepspeed_config_from_trainer(ZERO_2, precision="16-mixed", loss_scaling={"initial_scale_power": 8})

    assert default == {
        "enabled": True,
        "loss_scale": 0.0,
        "initial_scale_power": 16,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    }
    assert custom["fp16"]["initial_scale_power"] == 8


def test_translation_accumulation_clipping_and_micro_batch():
    config = deepspeed_config_from_trainer(ZERO_2, accumulate_grad_batches=4, gradient_clip_val=1.5, micro_batch_size=32)

    assert config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 1.5
    assert config["train_micro_batch_size_per_gpu"] == 32
    assert "train_micro_batch_size_per_gpu" not in deepspeed_config_from_trainer(ZERO_2)


def test_translation_offload_lets_torch_optimizers_step():
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    user_choice = {**offload, "zero_force_ds_cpu_optimizer": True}

    assert deepspeed_config_from_trainer(offload)["zero_force_ds_cpu_optimizer"] is False
    assert "zero_force_ds_cpu_optimizer" not in deepspeed_config_from_trainer(ZERO_2)
    assert deepspeed_config_from_trainer(user_choice)["zero_force_ds_cpu_optimizer"] is True


def test_translation_keeps_keys_the_base_sets_and_does_not_mutate_it():
    base = {"zero_optimization": {"stage": 3}, "gradient_clipping": 1.0, "bf16": {"enabled": True}}
    snapshot = json.loads(json.dumps(base))

    config = deepspeed_config_from_trainer(base, precision="bf16-mixed", gradient_clip_val=1.0)
    config["zero_optimization"]["stage"] = 0

    assert config["gradient_clipping"] == 1.0
    assert base == snapshot


# ---------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------


def _deepspeed(config: dict[str, Any]) -> DeepSpeedStrategy:
    return DeepSpeedStrategy(config=config)


CPU_2 = {"accelerator": "cpu", "devices": 2}

REFUSED = [
    ({**CPU_2, "strategy": "deepspeed_stage_2", "precision": "16-mixed"}, "bf16-mixed on CPU"),
    ({**CPU_2, "strategy": "ddp", "precision": 16}, "bf16-mixed on CPU"),
    ({**CPU_2, "strategy": "deepspeed_stage_1", "precision": "16-true"}, "needs AVX512-FP16"),
    ({**CPU_2, "strategy": "deepspeed_stage_3", "gradient_clip_algorithm": "value"}, "clips gradients by norm only"),
    ({**CPU_2, "strategy": "deepspeed_stage_2", "sync_batchnorm": True}, "silently ignored"),
    ({"accelerator": "cuda", "strategy": "deepspeed_stage_2", "sync_batchnorm": True}, "silently ignored"),
    ({**CPU_2, "strategy": "ddp", "sync_batchnorm": True}, "SyncBatchNorm runs on GPUs only"),
    ({"accelerator": "cpu", "sync_batchnorm": True}, "SyncBatchNorm runs on GPUs only"),
    ({**CPU_2, "strategy": "deepspeed_stage_1", "precision": "64-true"}, "DeepSpeed runs 32-true"),
    ({**CPU_2, "strategy": "deepspeed_stage_2", "accelerator": "mps"}, "not on mps"),
    ({"accelerator": "cuda", "devices": [1, 3], "strategy": "deepspeed_stage_2"}, "CUDA_VISIBLE_DEVICES=1,3"),
    ({**CPU_2, "strategy": "deepspeed_stage_9"}, "is not a strategy name"),
    ({**CPU_2, "strategy": "ddp", "precision": "fp8"}, "--trainer.precision 'fp8'"),
]

REFUSED_JSON = [
    ({"zero_optimization": {"stage": 1}, "pipeline": {"stages": 4}}, "pipeline engine"),
    ({"zero_optimization": {"stage": 3}, "tensor_parallel": {"autotp_size": 2}}, "AutoTP"),
    ({"zero_optimization": {"stage": 2}, "sequence_parallel_size": 2}, "sequence parallelism"),
    ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}, "--trainer.accumulate_grad_batches"),
    ({"zero_optimization": {"stage": 2}, "train_batch_size": 64}, "--data.batch_size"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}, "bf16.enabled=true but --trainer.precision is 32-true"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}, "gradient_clipping=1.0 but --trainer.gradient_clip_val is 0.5"),
]


@pytest.mark.parametrize(("trainer", "message"), REFUSED)
def test_impossible_combination_is_refused_with_the_fix(trainer, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_strategy(trainer)


@pytest.mark.parametrize(("config", "message"), REFUSED_JSON)
def test_contradicting_deepspeed_json_is_refused(config, message):
    trainer = {**CPU_2, "strategy": _deepspeed(config), "gradient_clip_val": 0.5}

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_trainer_config(trainer)


def test_lightnings_own_deepspeed_strategy_is_refused_on_cpu_with_the_replacement():
    with pytest.raises(ConfigError, match="deepres.strategies.DeepSpeedStrategy"):
        resolve_strategy({**CPU_2, "strategy": LightningDeepSpeedStrategy(stage=2)})


@pytest.mark.parametrize(
    "trainer",
    [
        {**CPU_2, "strategy": "ddp", "precision": "bf16-mixed", "gradient_clip_algorithm": "value", "gradient_clip_val": 1},
        {**CPU_2, "strategy": "ddp", "precision": "16-true"},
        {**CPU_2, "strategy": "deepspeed_stage_3", "precision": "bf16-mixed", "accumulate_grad_batches": 2},
        {"accelerator": "cuda", "devices": 2, "strategy": "deepspeed_stage_2", "precision": "16-mixed"},
        {"accelerator": "cuda", "devices": "0,1", "strategy": "deepspeed_stage_3_offload"},
        {"accelerator": "cuda", "devices": 4, "strategy": "ddp", "sync_batchnorm": True, "precision": "16-mixed"},
    ],
)
def test_possible_combinations_are_accepted(trainer):
    check_trainer_config(trainer)


# ---------------------------------------------------------------------------------------------------------
# The JIT op cache and convert-zero's errors
# ---------------------------------------------------------------------------------------------------------


def test_extension_cache_defaults_to_deepres_cache_and_respects_the_users_choice(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert use_persistent_extension_cache() == str(extension_cache_dir())
    assert "deepres/torch_extensions/py3" in os.environ["TORCH_EXTENSIONS_DIR"]

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert use_persistent_extension_cache() == str(tmp_path)


def test_convert_zero_refuses_what_is_not_a_zero_checkpoint(tmp_path, capsys):
    plain_file = tmp_path / "model.ckpt"
    plain_file.write_bytes(b"")

    assert convert_zero_main([str(tmp_path / "missing"), str(tmp_path / "out.ckpt")]) == 2
    assert convert_zero_main([str(plain_file), str(tmp_path / "out.ckpt")]) == 2
    err = capsys.readouterr().err
    assert err.count("is not a DeepSpeed ZeRO checkpoint directory") == 2
    assert "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# Real runs: 1 and 2 CPU processes
# ---------------------------------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """This environment without a surrounding job's ranks (SLURM, torchrun), one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for key in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_tiny(out: Path, *args: str, processes: int = 1) -> subprocess.CompletedProcess[str]:
    """Run tests/_tiny.py as its own command, once per rank.

    The ranks start together, as torchrun or srun start them (LOCAL_RANK set, so Lightning launches
    nothing), which halves the wall time of Lightning's own launcher: that one starts rank 1 only after
    rank 0 has imported everything. Lightning's launcher itself is exercised by the `deepres fit` test.
    """
    command = [sys.executable, str(TINY), "--out", str(out), *args]
    if processes == 1:
        return procs.run(command, 600, env=clean_env(), cwd=out.parent)
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0"}
    logs = [out / f"rank{rank}.log" for rank in range(processes)]
    ranks = [
        subprocess.Popen(command, cwd=out.parent, env={**clean_env(), **rendezvous, "LOCAL_RANK": str(rank)},
                         stdout=log.open("w"), stderr=subprocess.STDOUT)
        for rank, log in enumerate(logs)
    ]
    deadline = time.monotonic() + 600
    # A rank that fails leaves the others waiting in a collective: stop them rather than wait for gloo's timeout.
    while any(rank.poll() is None for rank in ranks):
        failed = any(rank.poll() not in (None, 0) for rank in ranks)
        if failed or time.monotonic() > deadline:
            for rank in ranks:
                rank.kill()
        time.sleep(0.2)
    returncode = next((rank.returncode for rank in ranks if rank.returncode), 0)
    output = "\n".join(f"--- {log.name}\n{log.read_text()}" for log in logs)
    return subprocess.CompletedProcess(command, returncode, stdout="", stderr=output)


def run_ok(out: Path, *args: str, processes: int = 2) -> dict[str, Any]:
    done = run_tiny(out, *args, processes=processes)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / "result.json").read_text())


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def plain_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def one_process_two_epochs(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference: one process, batch 16, two epochs (4 SGD steps)."""
    out = tmp_path_factory.mktemp("reference")
    result = run_ok(out, "--devices", "1", "--batch-size", "16", "--epochs", "2", processes=1)
    assert result["global_step"] == 4
    return plain_state_dict(out / "last.ckpt")


@pytest.mark.slow
@pytest.mark.distributed
def test_ddp_two_processes_take_the_step_of_one_process_on_the_doubled_batch(tmp_path, one_process_two_epochs):
    result = run_ok(tmp_path, "--strategy", "ddp", "--devices", "2", "--batch-size", "8", "--epochs", "2")

    assert (result["backend"], result["world_size"], result["global_step"]) == ("gloo", 2, 4)
    ddp = plain_state_dict(tmp_path / "last.ckpt")
    assert max_difference(ddp, one_process_two_epochs) < TOLERANCE
    assert max_difference(ddp, TinyClassifier().state_dict()) > 1e-2  # it trained


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_saves_resumes_and_converts(tmp_path, stage, one_process_two_epochs):
    name = f"deepspeed_stage_{stage}"
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    first.mkdir()
    resumed.mkdir()
    common = ["--strategy", name, "--devices", "2", "--batch-size", "8", "--gradient-clip-val", "100"]

    run_ok(first, *common, "--epochs", "1")
    assert (first / "last.ckpt" / "checkpoint").is_dir()  # ZeRO saves a directory
    result = run_ok(resumed, *common, "--epochs", "2", "--resume", str(first / "last.ckpt"))
    assert convert_zero_main([str(resumed / "last.ckpt"), str(tmp_path / "plain.ckpt")]) == 0

    assert (result["backend"], result["world_size"], result["global_step"]) == ("gloo", 2, 4)
    assert (checkpoint_global_step(first / "last.ckpt"), checkpoint_global_step(resumed / "last.ckpt")) == (2, 4)
    # 1 epoch, a new run resumed from the directory for a second: the same weights as 4 uninterrupted
    # steps of one process on the doubled batch (momentum included), read back without DeepSpeed.
    model = TinyClassifier()
    model.load_state_dict(plain_state_dict(tmp_path / "plain.ckpt"), strict=True)
    assert max_difference(model.state_dict(), one_process_two_epochs) < TOLERANCE
    # The config DeepSpeed ran with is the translation's, plus nothing else.
    expected = deepspeed_config_from_trainer(
        DeepSpeedStrategy(stage=stage).config, gradient_clip_val=100, micro_batch_size=8
    )
    assert result["deepspeed_config"] == expected


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_mixed_ddp_autocasts_and_trains(tmp_path):
    result = run_ok(tmp_path, "--strategy", "ddp", "--devices", "2", "--precision", "bf16-mixed", "--epochs", "2")

    assert result["dtypes"] == {"param": "torch.float32", "logits": "torch.bfloat16"}
    assert_trains_like_fp32(result["losses"])


@pytest.mark.slow
@pytest.mark.distributed
def test_bf16_mixed_deepspeed_with_optimizer_offload_trains(tmp_path, one_process_two_epochs):
    args = ["--strategy", "deepspeed_stage_2_offload", "--devices", "2", "--precision", "bf16-mixed", "--epochs", "2"]
    result = run_ok(tmp_path, *args)
    assert convert_zero_main([str(tmp_path / "last.ckpt"), str(tmp_path / "plain.ckpt")]) == 0

    assert result["dtypes"] == {"param": "torch.bfloat16", "logits": "torch.bfloat16"}
    config = result["deepspeed_config"]
    assert config["bf16"] == {"enabled": True}
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert_trains_like_fp32(result["losses"])
    # fp32 master weights, updated like the fp32 run's up to bf16 rounding of the forward pass
    plain = plain_state_dict(tmp_path / "plain.ckpt")
    assert all(t.dtype == torch.float32 for t in plain.values())
    assert max_difference(plain, one_process_two_epochs) < 2e-2


@pytest.mark.slow
@pytest.mark.distributed
def test_deepres_fit_with_zero_2_on_two_cpu_processes_resumes_and_converts(tmp_path):
    """The user's path: `deepres fit --trainer.strategy deepspeed_stage_2 --trainer.devices 2` on CPUs."""
    from deepres.training import Classifier

    def fit(*extra: str) -> subprocess.CompletedProcess[str]:
        args = ["--model.depth", "4", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "deepspeed_stage_2",
                "--run.root", str(tmp_path), "--run.name", "zero2", "--trainer.enable_progress_bar", "false"]
        return procs.run([sys.executable, "-m", "deepres", "fit", *args, *extra], 600, env=clean_env(),
                         cwd=tmp_path)

    first = fit("--trainer.max_epochs", "1")
    assert first.returncode == 0, first.stderr[-4000:]
    checkpoint = tmp_path / "zero2" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and checkpoint_global_step(checkpoint) == 2

    resumed = fit("--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert checkpoint_global_step(checkpoint) == 4

    assert convert_zero_main([str(checkpoint), str(tmp_path / "plain.ckpt")]) == 0
    model = Classifier.load_from_checkpoint(tmp_path / "plain.ckpt", map_location="cpu")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in Classifier(depth=4).parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2", "deepspeed_stage_3"])
def test_on_gpus_lightnings_path_runs_with_nccl(tmp_path, strategy):
    devices = str(min(2, torch.cuda.device_count()))
    result = run_ok(tmp_path, "--accelerator", "cuda", "--strategy", strategy, "--devices", devices, "--epochs", "1",
                    processes=int(devices))

    assert (result["backend"], result["global_step"]) == ("nccl", 32 // (8 * int(devices)))


# Rank 0's fp32 losses over 2 epochs of 2 processes x 8 rows (the same in every fp32 run above).
FP32_RANK0_LOSSES = [1.1887, 1.2263, 1.1179, 1.1591]


def assert_trains_like_fp32(losses: list[float]) -> None:
    assert all(math.isfinite(loss) for loss in losses)
    assert losses == pytest.approx(FP32_RANK0_LOSSES, abs=2e-2)


def test_refused_combination_exits_before_any_process_starts(tmp_path):
    done = run_tiny(tmp_path, "--strategy", "deepspeed_stage_2", "--devices", "2", "--precision", "16-mixed")

    assert done.returncode == 2
    assert "--trainer.precision 16-mixed on CPU" in done.stderr
    assert "Traceback" not in done.stderr
    assert "initializing deepspeed distributed" not in done.stderr + done.stdout
    assert not (tmp_path / "result.json").exists()
