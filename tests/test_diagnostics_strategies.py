"""Depth diagnostics mean the same under every strategy: one process, DDP, ZeRO-2 and the pipeline, on the same
weights and the same global batch, log the same error-flow ratio, activation RMS, gate openness and FLOPs per
sample (gradient norms too, except under ZeRO, which partitions the gradients and does not log them).

DEEPRES_DIAGNOSTICS_MD=path writes the table; docs/diagnostics.md quotes it.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import procs
import pytest

RUNS = {
    "one process": ["--data.batch_size", "32"],
    "DDP, 2 processes": ["--data.batch_size", "16", "--trainer.devices", "2", "--trainer.strategy", "ddp"],
    "ZeRO-2, 2 processes": ["--data.batch_size", "16", "--trainer.devices", "2",
                            "--trainer.strategy", "deepspeed_stage_2"],
    "pipeline, 2 stages": ["--data.batch_size", "32", "--trainer.devices", "2",
                           "--trainer.strategy", "deepres.strategies.PipelineStrategy",
                           "--trainer.strategy.microbatches", "4"],
}
COMMON = ["--trainer.accelerator", "cpu", "--model.depth", "9", "--model.width", "16", "--trainer.max_steps", "3",
          "--diagnostics.every_n_steps", "2", "--trainer.enable_progress_bar", "false", "--wandb.mode", "disabled",
          "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1"]


def measured(tmp_path: Path, name: str, args: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    run = name.split(",")[0].replace(" ", "-")
    done = procs.run([sys.executable, "-m", "deepres", "fit", *COMMON, *args, "--run.name", run], 600, env=env,
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((tmp_path / "runs" / run / "depth.jsonl").read_text().splitlines()[0])
    with open(tmp_path / "runs" / run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    flops = next(float(r["perf/flops_per_sample"]) for r in rows if r.get("perf/flops_per_sample"))
    return {**record, "flops_per_sample": flops}


@pytest.mark.slow
@pytest.mark.distributed
def test_diagnostics_are_the_same_under_every_strategy(tmp_path):
    found = {name: measured(tmp_path, name, args) for name, args in RUNS.items()}
    one = found["one process"]
    assert one["step"] == 0 and 0.1 < one["error_flow_ratio"] < 10
    table = ["| run | error-flow ratio | max abs. difference from one process: act RMS, gates, grad norms | "
             "FLOPs per sample |", "|---|---|---|---|"]
    for name, record in found.items():
        diffs = []
        for key in ("act_rms", "gate/transform", "grad_norm"):
            if key not in record:  # ZeRO partitions the gradients: no per-block norms
                assert key == "grad_norm" and name.startswith("ZeRO"), (name, key)
                diffs.append("not logged")
                continue
            difference = float(np.max(np.abs(np.array(record[key]) - np.array(one[key]))))
            assert difference <= 1e-6, (name, key, difference)
            diffs.append(f"{difference:.1e}")
        assert record["error_flow_ratio"] == pytest.approx(one["error_flow_ratio"], abs=1e-6), name
        assert record["flops_per_sample"] == one["flops_per_sample"], name
        table.append(f"| {name} | {record['error_flow_ratio']:.7f} | {', '.join(diffs)} | "
                     f"{record['flops_per_sample']:.0f} |")
    if os.environ.get("DEEPRES_DIAGNOSTICS_MD"):
        Path(os.environ["DEEPRES_DIAGNOSTICS_MD"]).write_text("\n".join(table) + "\n")
