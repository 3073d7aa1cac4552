"""Checkpoint files: atomic writes that keep the previous one, resume that skips damaged files and says so,
and loading that never runs code (a crafted checkpoint in every place deepres reads one from)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deepres.errors import ConfigError
from deepres.training import Classifier
from deepres.training.checkpoints import (
    CheckpointFiles,
    CheckpointWriteError,
    UnsafeCheckpointError,
    damage,
    find_resume_checkpoint,
    load_checkpoint,
    load_module,
)
from deepres.training.cli import main

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--wandb.enabled", "false"]


def _save(path: Path, step: int, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "w": torch.arange(1000.0)}, path)
    os.utime(path, (mtime, mtime))
    return path


class _RunsCode:
    """Unpickling this calls os.system: the payload of a crafted checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 3, "state_dict": {}, "payload": _RunsCode(marker)}, path)
    return path


# ------------------------------------------------------------------------------------------ writing
def test_a_new_checkpoint_keeps_the_previous_one_and_a_failed_write_leaves_both(tmp_path, monkeypatch):
    io = CheckpointFiles()
    last = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, last)
    io.save_checkpoint({"global_step": 2}, last)
    assert load_checkpoint(last)["global_step"] == 2
    assert load_checkpoint(tmp_path / "previous.ckpt")["global_step"] == 1

    import deepres.training.checkpoints as checkpoints

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.os, "fsync", disk_full)
    with pytest.raises(CheckpointWriteError, match=r"No space left on device.*last.ckpt \(step 2\) is untouched"):
        io.save_checkpoint({"global_step": 3, "w": torch.zeros(1_000_000)}, last)
    monkeypatch.undo()
    assert load_checkpoint(last)["global_step"] == 2
    assert load_checkpoint(tmp_path / "previous.ckpt")["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "previous.ckpt"]  # nothing partial


def test_interrupted_checkpoint_write_leaves_last_ckpt_loadable(tmp_path, monkeypatch):
    io = CheckpointFiles()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)

    class Crash(Exception):
        pass

    import deepres.training.checkpoints as checkpoints

    def crashing_fsync(fd):
        raise Crash("power cut while writing")

    monkeypatch.setattr(checkpoints.os, "fsync", crashing_fsync)
    with pytest.raises(Crash):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(10_000_000)}, path)
    monkeypatch.undo()
    ckpt = load_checkpoint(path)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


# ----------------------------------------------------------------------------------------- resuming
def test_resume_picks_the_newest_checkpoint_that_loads_and_says_what_it_skipped(tmp_path):
    now = time.time()
    previous = _save(tmp_path / "checkpoints" / "previous.ckpt", 10, now - 30)
    last = _save(tmp_path / "checkpoints" / "last.ckpt", 20, now - 20)
    truncated = _save(tmp_path / "hpc_ckpt_3.ckpt", 30, now - 10)
    truncated.write_bytes(truncated.read_bytes()[:-200])  # killed while writing
    os.utime(truncated, (now, now))
    assert find_resume_checkpoint(tmp_path)[:2] == (last, 20)

    # A flipped byte inside a record: the archive opens, its CRC check fails.
    data = bytearray(last.read_bytes())
    offset = data.find(b"\x00\x00\x80\x3f")  # 1.0 as float32, inside the tensor's record
    data[offset + 2] ^= 0xFF
    last.write_bytes(bytes(data))
    os.utime(last, (now - 20, now - 20))
    path, step, skipped = find_resume_checkpoint(tmp_path)
    assert (path, step) == (previous, 10)
    assert [s.path for s in skipped] == [truncated, last]
    assert "truncated" in skipped[0].reason and "CRC" in skipped[1].reason
    assert damage(previous) is None and find_resume_checkpoint(tmp_path / "nothing-here") == (None, 0, [])


# ------------------------------------------------------------------------- checkpoints never run code
def test_a_crafted_checkpoint_is_refused_by_the_loaders(tmp_path):
    marker = tmp_path / "pwned"
    crafted = crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match=r"would call `posix.system`.*--weights_only false"):
        load_checkpoint(crafted)
    with pytest.raises(UnsafeCheckpointError):
        load_module(Classifier, crafted)  # what the reproduction scripts use
    with pytest.raises(UnsafeCheckpointError):
        find_resume_checkpoint(_run_with(tmp_path / "run", crafted))
    assert not marker.exists()


def _run_with(run_dir: Path, checkpoint: Path) -> Path:
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(checkpoint.read_bytes())
    return run_dir


def _deepres(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepres", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.mark.parametrize("place", ["ckpt_path", "last", "slurm_restart", "convert_zero"])
def test_a_crafted_checkpoint_creates_no_file_wherever_deepres_reads_it(tmp_path, place):
    marker = tmp_path / "pwned"
    run = tmp_path / "runs" / "x"
    env = None
    if place == "ckpt_path":
        args = ["fit", "--run.name", "x", "--ckpt_path", str(crafted_checkpoint(tmp_path / "evil.ckpt", marker))]
    elif place == "last":
        crafted_checkpoint(run / "checkpoints" / "last.ckpt", marker)
        args = ["fit", "--run.name", "x", "--ckpt_path", "last"]
    elif place == "slurm_restart":  # a requeued SLURM job resumes from the newest checkpoint of its run
        crafted_checkpoint(run / "checkpoints" / "last.ckpt", marker)
        (run / "submit.sbatch").write_text("#!/bin/bash\n")
        env = {"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "x"}
        args = ["fit", "--run.name", "x"]
    else:
        zero = tmp_path / "zero" / "checkpoint"
        zero.mkdir(parents=True)
        (zero.parent / "latest").write_text("checkpoint")
        crafted_checkpoint(zero / "mp_rank_00_model_states.pt", marker)
        args = ["convert-zero", str(zero.parent), str(tmp_path / "out.ckpt")]
    result = _deepres(*args, *(QUIET if args[0] == "fit" else []), cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    refusal = [line for line in result.stderr.splitlines() if "refused to load" in line]
    assert len(refusal) == 1 and "posix.system" in refusal[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not marker.exists()


# ------------------------------------------------------------------------------ resume says what it does
def test_ckpt_path_last_without_a_checkpoint_is_an_error_and_auto_starts_over_beside_the_old_rows(tmp_path):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "run_info.json").write_text("{}")
    (run / "metrics.csv").write_text("epoch,step,train/loss\n0,0,2.3\n")
    common = ["fit", "--run.root", str(tmp_path / "runs"), "--run.name", "x", *QUIET, "--model.depth", "3",
              "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
    assert main([*common, "--ckpt_path", "last"]) == 2
    assert sorted(p.name for p in run.iterdir()) == ["metrics.csv", "run_info.json"]  # nothing written
    assert main([*common, "--ckpt_path", "auto"]) == 0
    kept = list(run.glob("metrics.before-*.csv"))
    assert len(kept) == 1 and kept[0].read_text() == "epoch,step,train/loss\n0,0,2.3\n"
    assert "2.3" not in (run / "metrics.csv").read_text()  # the new rows only
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 2


def test_last_message_names_the_run_directory_and_what_it_holds(tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "run_info.json").write_text("{}")
    rc = main(["fit", "--run.root", str(tmp_path / "runs"), "--run.name", "x", "--ckpt_path", "last", *QUIET])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"no complete checkpoint to resume from ({run} holds run_info.json; no checkpoints/)" in err
    assert "--ckpt_path auto" in err


def test_a_run_directory_in_use_by_a_live_run_is_refused(tmp_path):
    run = tmp_path / "runs" / "x"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from deepres.training.run_dir import lock_run_dir; "
         f"lock_run_dir(__import__('pathlib').Path({str(run)!r})); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _save(run / "checkpoints" / "last.ckpt", 5, time.time())
        with pytest.raises(ConfigError, match=rf"in use by a live run \(host .* pid {holder.pid}"):
            from deepres.training.run_dir import lock_run_dir

            lock_run_dir(run)
    finally:
        holder.kill()
        holder.wait()
    from deepres.training.run_dir import lock_run_dir, release_run_dir_locks

    lock_run_dir(run)  # free once that process is gone
    release_run_dir_locks()


def test_a_row_lost_between_a_save_and_its_logging_is_written_by_the_resume_once(tmp_path):
    """Lightning writes an epoch's row (and a step's) after the hook that saves the checkpoint; a process that dies
    in between (a DDP rank killed inside the save leaves rank 0 waiting at its barrier) never writes it. The
    checkpoint carries the row and the resume writes it when metrics.csv lacks it, and only then."""
    import csv

    from lightning.pytorch import LightningModule, Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from deepres.training.run_checkpoint import RunCheckpoint
    from deepres.training.run_dir import RunCSVLogger

    class EpochMean(LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch[0]).pow(2).mean()
            self.log("train/epoch_mean", loss, on_step=False, on_epoch=True)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    run_dir = tmp_path / "run"
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)  # 4 steps an epoch

    def fit(epochs: int, resume: bool) -> list[dict]:
        trainer = Trainer(max_epochs=epochs, logger=RunCSVLogger(run_dir), enable_progress_bar=False,
                          enable_model_summary=False, accelerator="cpu", devices=1, log_every_n_steps=100,
                          callbacks=[RunCheckpoint(run_dir / "checkpoints", every_minutes=None)])
        trainer.fit(EpochMean(), data, ckpt_path=str(run_dir / "checkpoints" / "last.ckpt") if resume else None)
        with open(run_dir / "metrics.csv", newline="") as f:
            return [r for r in csv.DictReader(f) if r.get("train/epoch_mean")]

    first = fit(1, resume=False)
    assert [r["step"] for r in first] == ["3"]
    with open(run_dir / "metrics.csv", "w") as f:  # the row the dying process never wrote
        f.write("epoch,step,train/epoch_mean\n")
    rows = fit(2, resume=True)
    assert [(r["epoch"], r["step"], r["train/epoch_mean"]) for r in rows][0] == \
        (first[0]["epoch"], first[0]["step"], first[0]["train/epoch_mean"])
    assert [r["step"] for r in rows] == ["3", "7"]
    assert [r["step"] for r in fit(3, resume=True)] == ["3", "7", "11"]  # present rows are not written again
