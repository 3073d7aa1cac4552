"""A resume is checked against the settings its checkpoint was written with, and continues every random
generator where the checkpoint left it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepres.errors import ConfigError
from deepres.training.cli import main
from deepres.training.resume_check import SETTINGS_KEY, check_resume, result_settings
from deepres.training.rng_state import RNG_KEY

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--wandb.enabled", "false", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1",
         "--model.depth", "3"]


def fit(root: Path, *args: str, name: str = "r") -> int:
    return main(["fit", "--run.root", str(root), "--run.name", name, *QUIET, *args])


def written(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Every file under the run directory with its size and modification time."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in run_dir.rglob("*") if p.is_file()}


def test_a_resume_that_would_change_the_result_is_refused_in_one_line_before_anything_is_written(tmp_path, capsys):
    root = tmp_path / "runs"
    assert fit(root, "--trainer.max_steps", "2") == 0
    run_dir = root / "r"
    before = written(run_dir)
    capsys.readouterr()

    assert fit(root, "--trainer.max_steps", "4", "--ckpt_path", "last", "--data.batch_size", "32",
               "--model.optim.lr", "0.1") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"deepres: error: --ckpt_path {run_dir}/checkpoints/last.ckpt: this run's settings differ from "
                   "the checkpoint's, and resuming would change the result: data.batch_size 64 → 32; "
                   "model.optim.lr 0.05 → 0.1. Set them back to resume this run as it was, pass "
                   "--run.resume_allow_changes data.batch_size,model.optim.lr to continue with the new values, or "
                   "start a new run without --ckpt_path."), err
    assert written(run_dir) == before and sorted(p.name for p in root.iterdir()) == ["r"]

    # what cannot change the result resumes: logging, progress, checkpoint interval, a longer run
    assert fit(root, "--trainer.max_steps", "3", "--ckpt_path", "last", "--trainer.log_every_n_steps", "2",
               "--run.progress", "lines", "--run.checkpoint_every_n_steps", "1") == 0
    # a change the user names resumes, and the checkpoints from then on carry the new value
    assert fit(root, "--trainer.max_steps", "4", "--ckpt_path", "last", "--data.batch_size", "32",
               "--run.resume_allow_changes", "batch_size") == 0
    assert "resuming with data.batch_size 64 → 32" in capsys.readouterr().err
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4 and checkpoint[SETTINGS_KEY]["data.batch_size"] == 32
    # validate only reads the weights: any batch size
    assert main(["validate", "--run.root", str(root), "--run.name", "v", *QUIET, "--data.batch_size", "16",
                 "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]) == 0


def _checkpoint(path: Path, **changes) -> Path:
    plan = {"model": {"module": "Classifier", "arch": "highway_mlp", "options": {"depth": 3}},
            "data": {"module": "DigitsDataModule", "batch_size": 64},
            "trainer": {"processes": 2, "precision": "32-true", "accumulate_grad_batches": 1}}
    settings = result_settings(plan, {"optim": {"name": "sgd", "lr": 0.05, "betas": (0.9, 0.999)}})
    torch.save({"global_step": 5, SETTINGS_KEY: {**settings, **changes}}, path)
    return path


def test_a_new_number_of_processes_resumes_when_the_global_batch_is_the_same(tmp_path):
    ckpt = _checkpoint(tmp_path / "two.ckpt")  # 2 processes × 64
    one = result_settings({"model": {"module": "Classifier", "arch": "highway_mlp", "options": {"depth": 3}},
                           "data": {"module": "DigitsDataModule", "batch_size": 128},
                           "trainer": {"processes": 1, "precision": "32-true"}},
                          {"optim": {"name": "sgd", "lr": 0.05, "betas": [0.9, 0.999]}})
    assert check_resume(ckpt, one) == []
    four = {**one, "processes": 4, "data.batch_size": 32}
    assert check_resume(ckpt, four) == []
    with pytest.raises(ConfigError) as refused:
        check_resume(ckpt, {**one, "processes": 4})  # 4 × 128
    assert "global_batch 128 (2 × 64 × 1) → 512 (4 × 128 × 1)" in str(refused.value)
    assert "data.batch_size" not in str(refused.value).split("result: ")[1].split(".")[0]
    with pytest.raises(ConfigError, match="lr_typo is no setting a resume compares"):
        check_resume(ckpt, one, allow="lr_typo")


def test_a_checkpoint_without_its_settings_is_checked_against_its_run_directorys_plan(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    plan = {"model": {"module": "Classifier", "arch": "highway_mlp", "options": {"depth": 3}},
            "data": {"module": "DigitsDataModule", "batch_size": 64}, "trainer": {"processes": 1}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    old = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 5, "hyper_parameters": {"optim": {"name": "sgd", "lr": 0.05}}}, old)
    same = result_settings(plan, {"optim": {"name": "sgd", "lr": 0.05}})
    assert check_resume(old, same) == []
    with pytest.raises(ConfigError, match=r"model.depth 3 → 5; model.optim.lr 0.05 → 0.1"):
        check_resume(old, {**same, "model.depth": 5, "model.optim.lr": 0.1})


def test_every_random_generator_continues_after_a_resume_as_in_the_uninterrupted_run(tmp_path):
    """Batch 512: 2 steps per digits epoch, so the run stops inside an epoch and the resumed part crosses epoch
    ends and validations; draws from Python, NumPy and torch before every step must match the run in one go."""
    common = ["--data.batch_size", "512", "--trainer.callbacks+=_rng_draws.RecordDraws"]
    whole, split = tmp_path / "whole.jsonl", tmp_path / "split.jsonl"
    assert fit(tmp_path, *common, f"--trainer.callbacks.path={whole}", "--trainer.max_steps", "7", name="w") == 0
    assert fit(tmp_path, *common, f"--trainer.callbacks.path={split}", "--trainer.max_steps", "3", name="s") == 0
    states = torch.load(tmp_path / "s" / "checkpoints" / "last.ckpt", weights_only=True)[RNG_KEY]
    assert len(states) == 1 and {"python", "numpy", "torch"} <= states[0].keys()
    assert fit(tmp_path, *common, f"--trainer.callbacks.path={split}", "--trainer.max_steps", "7",
               "--ckpt_path", "last", name="s") == 0
    draws = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in
             (("whole", whole), ("split", split))}
    assert [d["step"] for d in draws["split"]] == list(range(7))
    assert draws["split"] == draws["whole"]
