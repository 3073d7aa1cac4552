"""scripts/tools/gpu_check.py: the dry run (no GPU) reports every CUDA step as skipped and really runs the rest;
the pieces its GPU steps are made of (the `deepres fit` probe, the child-process runner) run on CPU.

`main(argv)` runs in this process with scripts/ on sys.path, as when the script is run directly."""

from __future__ import annotations

import csv
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
for folder in (SCRIPTS, SCRIPTS / "benchmarks", SCRIPTS / "tools"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import gpu_check  # noqa: E402


def test_dry_run_skips_every_cuda_step_and_runs_the_rest(tmp_path):
    assert gpu_check.main(["--dry-run", "--out-dir", str(tmp_path)]) == 0
    with open(tmp_path / "gpu_check_dry_run.csv") as f:
        rows = {r["step"]: r for r in csv.DictReader(f)}
    assert list(rows) == list(gpu_check.STEP_NAMES)
    assert {r["status"] for r in rows.values()} == {"skipped"}  # nothing failed while being prepared
    numbers = {name: json.loads(r["numbers"]) for name, r in rows.items()}

    # FLOPs counted on the meta device: ResNet-50 training ≈ 24.5 GFLOP per 224² image (3 × forward);
    # Highway-ResNet-50's gate convolutions add a little
    resnet50, highway = numbers["resnet50"]["train_flops"], numbers["highway_resnet50"]["train_flops"]
    assert resnet50 == pytest.approx(24.5e9, rel=0.01)
    assert resnet50 < highway < 1.1 * resnet50

    # the memory prediction was measured on this CPU: what one more image's activations cost, times 128
    pre = numbers["preact1001"]
    assert pre["blocks"] == 333 and pre["k"] == round(math.sqrt(333))
    (b, b2), (small, large) = pre["cpu_batches"], pre["cpu_activation_bytes"]
    assert b2 == 2 * b and 0 < small < large
    assert pre["predicted_activation_bytes"] == pytest.approx((large - small) / b * 128)
    assert pre["predicted_peak_bytes"] > pre["static_bytes"] > 3 * 10e6 * 4  # > 3 copies of 10.2 M fp32 weights

    # the `deepres fit` command lines parse, and their strategies resolve for a CUDA device
    assert "strategy ddp" in numbers["ddp"]["checked"]
    assert "ZeRO stage 2, bf16" in numbers["zero2"]["checked"]
    assert "ZeRO stage 3, bf16" in numbers["zero3"]["checked"]
    assert numbers["shards"]["images"] == 24  # JPEGs generated and written to shards by `deepres shard`

    markdown = (tmp_path / "gpu_check_dry_run.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ") and "skipped" in line]
    assert len(table) == len(rows)
    assert "no CUDA device (dry run on CPU)" in markdown and "load average" in markdown
    for row in (tmp_path / "gpu_check_dry_run_summary.md").read_text().splitlines():
        assert row.startswith("| ") and row.endswith(" |") and row.count(" | ") == 4, row


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_a_gpu_only_the_dry_run_runs(tmp_path, capsys):
    assert gpu_check.main(["--out-dir", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_check_fit_argv_refuses_what_deepres_fit_would_refuse(tmp_path):
    argv = gpu_check.fit_argv(["--model.arch", "resnet20_cifar"], batch=8, shape=(3, 32, 32), num_classes=10,
                              warmup=1, steps=2, root=str(tmp_path), name="probe")
    assert gpu_check.check_fit_argv(argv) == "arguments parse; strategy auto"
    with pytest.raises(RuntimeError, match="refused"):
        gpu_check.check_fit_argv([*argv, "--model.no_such_option", "1"])


def test_fit_probe_times_steps_and_reads_what_the_trainer_ran(tmp_path):
    # DDP with one rank, as the GPU step runs it; on CPU Lightning's backend is gloo instead of NCCL
    argv = gpu_check.fit_argv(["--model.arch", "resnet20_cifar", "--trainer.strategy", "ddp"], batch=8,
                              shape=(3, 32, 32), num_classes=10, warmup=1, steps=2, root=str(tmp_path),
                              name="probe", accelerator="cpu")
    environment = dict(os.environ)
    try:
        record = gpu_check.fit_probe(argv)
    finally:
        # Lightning leaves the one-rank process group up and its rendezvous variables (LOCAL_RANK, MASTER_PORT,
        # WORLD_SIZE, ...) in the environment: a later test's subprocess would take itself for an external rank.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environment)
    assert record["strategy"] == "DDPStrategy" and record["backend"] == "gloo"
    assert record["optimizer"] == "SGD" and record["fused"] is True  # deepres picks torch's fused kernel
    assert record["s_per_step"] > 0 and record["images_per_s"] == pytest.approx(8 / record["s_per_step"])
    assert record["blocks"] == 9 and record["compiled_blocks"] == 0 and record["channels_last"] is False
    assert (tmp_path / "probe" / "checkpoints" / "last.ckpt").exists()  # the real `deepres fit`, end to end
    # on a GPU the step insists on what it is there to check
    gpu_check.check_record(record, {"backend": "gloo", "fused": True})
    with pytest.raises(RuntimeError, match="backend = 'gloo', not 'nccl'"):
        gpu_check.check_record(record, {"backend": "nccl"})
    with pytest.raises(RuntimeError, match="loss_scale = None"):
        gpu_check.check_record(record, {"loss_scale": None})  # None: must be there at all
    with pytest.raises(RuntimeError, match="loss is nan"):
        gpu_check.check_record({**record, "loss": float("nan")}, {})


def test_run_child_reports_results_errors_and_timeouts(tmp_path):
    py = sys.executable
    ok = gpu_check.run_child([py, "-c", f"print('noise'); print({gpu_check.RESULT_PREFIX!r} + '{{\"x\": 2}}')"], 30)
    assert ok == ("ok", {"x": 2}, "")
    status, numbers, error = gpu_check.run_child(
        [py, "-c", "import sys; print('warning: ignored', file=sys.stderr); raise ValueError('bad shape (3, 4)')"], 30)
    assert (status, numbers) == ("failed", {}) and error == "exit 1: ValueError: bad shape (3, 4)"
    _, _, error = gpu_check.run_child(
        [py, "-c", "import sys; print('deepres: error: --trainer.precision 16-mixed on CPU', file=sys.stderr); "
                   "raise RuntimeError('deepres fit exited with 2')"], 30)
    assert error == "exit 1: deepres: error: --trainer.precision 16-mixed on CPU"  # the cause, not the wrapper
    # a hung child: stopped, and the stack of where it hung is in its log
    log = tmp_path / "hung.log"
    status, _, error = gpu_check.run_child([py, "-c", "import time\ndef wait_for_nccl():\n    time.sleep(30)\n"
                                                     "wait_for_nccl()"], 2, log)
    assert status == "failed" and error == "timed out after 2 s"
    assert "wait_for_nccl" in log.read_text()


def test_a_step_runs_in_its_own_process(tmp_path):
    """The path every GPU step takes (child process, payload, result line), with the LSTM step on CPU."""
    settings = {"device": "cpu", "lstm_batch": 4, "lstm_steps": 10, "lstm_hidden": 8, "steps": 2,
                "preact_batch": 2, "work": str(tmp_path)}
    cmd = [sys.executable, str(SCRIPTS / "tools" / "gpu_check.py"), "--child", "lstm",
           "--payload", json.dumps({"settings": settings, "prepared": {}})]
    status, numbers, error = gpu_check.run_child(cmd, 120)
    assert (status, error) == ("ok", "")
    assert numbers["deepres_s"] > 0 and numbers["cudnn_s"] > 0 and numbers["cudnn"] is False
    assert numbers["implementation"].startswith("deepres.models.")
