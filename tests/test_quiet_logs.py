"""What `deepres fit` prints when its output goes to a file (a SLURM log): plain progress lines, no third-party
hints that do not apply, a short wandb ending."""

from __future__ import annotations

import io
import os
import sys
from types import SimpleNamespace

from deepres.training.progress import ProgressLines, ThrottledProgressBar, progress_callback
from tests.procs import run

PYTHON = sys.executable


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_progress_is_a_bar_on_a_terminal_and_lines_in_a_file():
    assert isinstance(progress_callback("auto", stream=_Tty()), ThrottledProgressBar)
    assert isinstance(progress_callback("auto", stream=io.StringIO()), ProgressLines)
    assert isinstance(progress_callback("bar", stream=io.StringIO()), ThrottledProgressBar)
    assert progress_callback("lines", 7, stream=_Tty()).every_n_steps == 7


def test_a_fit_logged_to_a_file_has_plain_lines_and_none_of_the_noise(tmp_path):
    # An `srun` on PATH, as on a login node: Lightning would print its "prepend srun" hint.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SILENT", None)
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    result = run([PYTHON, "-m", "deepres", "fit", "--run.root", str(tmp_path / "runs"), "--model.depth", "3",
                  "--trainer.max_steps", "12", "--trainer.max_epochs", "-1", "--trainer.limit_train_batches", "6",
                  "--trainer.limit_val_batches", "1", "--run.progress_every_n_steps", "5",
                  "--trainer.log_every_n_steps", "1",
                  # measured with torch's profiler, whose C++ side prints lines of its own
                  "--model.memory.activation_checkpointing", "auto", "--model.memory.memory_budget_gb", "1"],
                 timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out, err = result.stdout, result.stderr
    assert "\r" not in out and "it/s" not in out  # no bar
    lines = [line for line in out.splitlines() if line.startswith("[deepres] ")]
    assert [line.split("  ")[1] for line in lines] == ["step 5/12", "step 6/12", "step 10/12", "step 12/12"]
    assert lines[0].startswith("[deepres] epoch 1  step 5/12  train/loss=") and "steps/s" in lines[0]
    assert lines[1].startswith("[deepres] epoch 1 done  step 6/12  val/acc1=")
    both = out + err
    for noise in ("srun", "💡 Tip", "LeafSpec", "weights_only", "TPU available", "Loading `train_dataloader`",
                  "Run history", "Run summary", "Tracking run with wandb", "gpuGetDeviceCount", "profiler_start"):
        assert noise not in both, noise
    assert "GPU available: False, used: False" in err  # what applies stays
    assert "memory    auto within 1 GB: chose none, predicted step peak" in out  # the plan says what auto chose
    if "wandb: could not start run" in err:
        # wandb's own service can fail to start on a loaded machine ("Failed to connect to service on socket"):
        # then the run goes on without it, says so once, and promises no upload
        assert err.count("Training goes on without wandb;") == 1 and "wandb sync " not in out, err[-3000:]
    else:
        assert "wandb sync " in out, err[-3000:]  # the short wandb ending: how to upload the offline run
    print(f"LOG LINES: stdout {len(out.splitlines())}, stderr {len(err.splitlines())}")


def test_progress_lines_show_the_composite_gain_of_multi_stream_blocks(capsys):
    diagnostics = SimpleNamespace(latest_composite={"hyper/composite/min_col_sum": 0.41,
                                                    "hyper/composite/max_col_sum": 2.5,
                                                    "hyper/composite/max_row_sum": 3.0})
    trainer = SimpleNamespace(global_step=50, current_epoch=0, max_epochs=1, estimated_stepping_batches=100,
                              callbacks=[diagnostics], progress_bar_metrics={})
    lines = ProgressLines(every_n_steps=50)
    lines.get_metrics = lambda trainer, module: {"train/loss": 0.5}
    lines.on_train_batch_end(trainer, None, None, None, 0)
    assert "train/loss=0.5  ∏H^res col sums 0.41-2.5  " in capsys.readouterr().out
    diagnostics.latest_composite = {}  # one-stream blocks: nothing to show
    trainer.global_step = 100
    lines.on_train_batch_end(trainer, None, None, None, 0)
    assert "∏H^res" not in capsys.readouterr().out
