"""The run plan: every setting resolved and checked before anything is written, shown at the start and kept as
plan.json; the printed configuration holds the values that run; bad values get one line naming the fix."""

import json
import math
from pathlib import Path

import pytest

from deepres.errors import ConfigError
from deepres.training.cli import main
from deepres.training.plan import MemoryPlan, build_plan, trainer_plan

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--wandb.mode", "disabled"]


def run(tmp_path: Path, *args: str, name: str = "t") -> int:
    return main(["fit", "--run.root", str(tmp_path / "runs"), "--run.name", name, *QUIET, *args])


# ---------------------------------------------------------------------------------------------- the memory plan
@pytest.mark.parametrize("setting, mode, every", [
    (0, "none", None), ("none", "none", None), (4, "every", 4), ("4", "every", 4), ("sqrt", "sqrt", None),
    ("all", "all", None), ("selective", "selective", 1), ("selective:3", "selective", 3),
    ("selective:sqrt", "selective", "sqrt"),
])
def test_memory_settings_parse_into_one_typed_plan(setting, mode, every):
    plan = MemoryPlan.parse({"activation_checkpointing": setting})
    assert (plan.mode, plan.every) == (mode, every)


@pytest.mark.parametrize("memory, reversible, fragment", [
    ({"activation_checkpointing": "sqr"}, False, "Did you mean 'sqrt'?"),
    ({"activation_checkpointing": "auto"}, False, "give --model.memory.memory_budget_gb"),
    ({"activation_checkpointing": "sqrt", "memory_budget_gb": 4.0}, False, "is read only by"),
    ({"activation_checkpointing": "selective:x"}, False, "selective:K with K an integer"),
    ({"activation_checkpointing": -1}, False, "integer >= 1"),
    ({"activation_checkpointing": 2}, True, "Use one of the two"),
])
def test_memory_settings_that_cannot_run_are_refused_with_the_fix(memory, reversible, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("?", r"\?")):
        MemoryPlan.parse(memory, reversible=reversible)


def test_auto_with_a_budget_and_reversible_blocks_are_plans_of_their_own():
    assert MemoryPlan.parse({"activation_checkpointing": "auto", "memory_budget_gb": 2}).budget_gb == 2
    assert MemoryPlan.parse({}, reversible=True).mode == "reversible"


# ---------------------------------------------------------------------------------------------- the trainer plan
def test_clipping_under_mixed_precision_plans_the_unfused_optimizer():
    assert trainer_plan({"precision": "bf16-mixed", "gradient_clip_val": 1.0}).fused_optimizer is False
    assert trainer_plan({"precision": "bf16-mixed"}).fused_optimizer is True
    assert trainer_plan({"gradient_clip_val": 1.0}).fused_optimizer is True
    plan = trainer_plan({"strategy": "deepspeed_stage_2", "devices": 2, "accelerator": "cpu"})
    assert (plan.zero_stage, plan.processes) == (2, 2)


@pytest.mark.parametrize("key, value", [("max_epochs", -2), ("max_steps", -5), ("accumulate_grad_batches", 0)])
def test_impossible_trainer_counts_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"--trainer.{key} {value}"):
        trainer_plan({key: value})


# ---------------------------------------------------------------------------------------------- on the command line
@pytest.mark.parametrize("args, fragment", [
    (["--model.memory.activation_checkpointing", "sqr"], "Did you mean 'sqrt'?"),
    (["--model.memory.activation_checkpointing", "auto"], "memory_budget_gb"),
    (["--trainer.max_epochs", "-2"], "--trainer.max_epochs -2"),
    (["--data.batch_size", "0"], "--data.batch_size 0"),
    (["--model.drop_path", "1.5"], "--model.drop_path 1.5"),
    (["--model.optim.name", "sdg"], "'sdg' is not one of sgd, adamw, adam (did you mean 'sgd'?)"),
    (["--model.schedule.name", "cosin"], "(did you mean 'cosine'?)"),
    (["--model.memory.activation_checkpointing", "selective", "--model.memory.compile", "true"],
     "torch.compile cannot trace"),
    (["--model.memory.activation_checkpointing", "selective", "--trainer.strategy", "deepspeed_stage_3",
      "--trainer.devices", "2", "--trainer.accelerator", "cpu"], "selective with ZeRO stage 3"),
    (["--model.ema_decay", "0.99", "--trainer.strategy", "deepspeed_stage_3", "--trainer.devices", "2",
      "--trainer.accelerator", "cpu"], "--model.ema_decay with ZeRO stage 3"),
    (["--model.ema_decay", "0.99", "--trainer.strategy", "pipeline", "--trainer.devices", "2",
      "--trainer.accelerator", "cpu"], "--model.ema_decay with --trainer.strategy pipeline"),
])
def test_bad_values_are_refused_in_one_line_before_anything_is_written(tmp_path, capsys, args, fragment):
    assert run(tmp_path, *args) == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("deepres: error:"))
    assert fragment in line, err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_misspelt_key_in_a_yaml_file_names_the_file_and_the_key(tmp_path, capsys):
    (tmp_path / "job.yaml").write_text("trainer:\n  max_epoch: 3\n")
    (tmp_path / "net.yaml").write_text("model:\n  init_args:\n    depht: 3\n")
    assert run(tmp_path, "--config", str(tmp_path / "job.yaml")) == 2
    assert f"trainer.max_epoch (in {tmp_path / 'job.yaml'}) is not a key (did you mean trainer.max_epochs?)" \
        in capsys.readouterr().err
    assert run(tmp_path, "--config", str(tmp_path / "net.yaml")) == 2
    err = capsys.readouterr().err
    assert f"has no option 'depht' (did you mean 'depth'?) (in {tmp_path / 'net.yaml'})" in err, err


def test_print_config_shows_the_values_that_run_and_runs_as_printed(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--print_config"])
    assert stop.value.code == 0
    printed = capsys.readouterr().out
    init = __import__("yaml").safe_load(printed)["model"]["init_args"]
    assert (init["depth"], init["width"], init["gate"], init["gate_bias"]) == (100, 50, "highway", "auto")
    (tmp_path / "printed.yaml").write_text(printed)
    assert run(tmp_path, "--config", str(tmp_path / "printed.yaml"), "--trainer.max_steps", "1",
               "--trainer.limit_val_batches", "1", "--model.depth", "3") == 0


def test_the_default_job_shows_its_plan_and_keeps_it_and_a_short_run_records_its_loss(tmp_path, capsys):
    """The default job's own settings (log_every_n_steps 10) on a run of 3 steps: the plan block says what ran,
    plan.json keeps it, and the final loss is in metrics.csv and finished.json although no step was logged."""
    assert run(tmp_path, "--trainer.max_steps", "3", "--model.memory.activation_checkpointing", "sqrt",
               "--trainer.precision", "bf16-mixed", "--trainer.gradient_clip_val", "1.0") == 0
    out = capsys.readouterr().out
    block = out[out.index("deepres run plan"):].splitlines()
    block = block[:next(i for i, line in enumerate(block) if line.startswith("  outputs")) + 1]
    assert len(block) <= 15
    text = "\n".join(block)
    assert "highway_mlp: depth 100, width 50, gate highway" in text and "in 99 blocks" in text
    assert "checkpointing sqrt (k = 10)" in text
    assert "bf16-mixed, clip 1" in text and "unfused optimizer" in text
    run_dir = tmp_path / "runs" / "t"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["model"]["options"]["depth"] == 100 and plan["memory"]["segment"] == 10
    assert plan["trainer"]["precision"] == "bf16-mixed" and plan["model"]["blocks"] == 99
    finished = json.loads((run_dir / "finished.json").read_text())
    assert math.isfinite(finished["metrics"]["train/loss"])
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    losses = [r.split(",")[header.index("train/loss")] for r in rows[1:]]
    assert any(v for v in losses), rows


def test_the_plan_of_a_config_file_is_built_without_writing(tmp_path):
    """build_plan reads the parsed namespace only: a pipeline plan over 2 processes is checked, not started."""
    from jsonargparse import Namespace

    cfg = Namespace(trainer={"strategy": "ddp", "devices": 2, "accelerator": "cpu"},
                    model=Namespace(class_path="deepres.training.Classifier",
                                    init_args=Namespace(arch="highway_mlp", depth=12, memory={})),
                    data=Namespace(class_path="deepres.data.DigitsDataModule", init_args=Namespace(batch_size=8)),
                    seed_everything=0)
    plan = build_plan(cfg)
    assert plan.trainer.processes == 2 and plan.model.options["depth"] == 12 and plan.data.batch_size == 8
    assert not any(tmp_path.iterdir())
