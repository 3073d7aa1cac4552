"""`deepres report RUN_DIR`: PNGs from a run directory's metrics.csv and depth.jsonl."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepres import cli
from deepres.observability.report import DepthHistory, main, read_depth_file

DEPTH_FIGURES = {"grad_norm.png", "gates.png", "act_rms.png", "error_flow.png"}


def write_metrics(run_dir: Path, steps: int = 60) -> None:
    """A metrics.csv as Lightning's CSVLogger writes it: one row per logging call, blanks elsewhere."""
    keys = ["epoch", "step", "train/loss", "train/acc1", "val/loss", "val/acc1"]
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for step in range(0, steps, 5):
            writer.writerow({"epoch": step // 20, "step": step, "train/loss": 2.3 * math.exp(-step / 20),
                             "train/acc1": 1 - math.exp(-step / 20)})
            if step % 20 == 15:
                writer.writerow({"epoch": step // 20, "step": step, "val/loss": 2.0 * math.exp(-step / 25),
                                 "val/acc1": 0.9 * (1 - math.exp(-step / 25))})


def write_depth(run_dir: Path, blocks: int = 30, steps: int = 40, gates: bool = True) -> None:
    rng = np.random.default_rng(0)
    with (run_dir / "depth.jsonl").open("w") as f:
        for i in range(steps):
            record = {"step": 10 * i, "epoch": i // 10, "error_flow_ratio": 0.7 - 0.005 * i,
                      "grad_norm": (1e-3 * np.exp(rng.normal(size=blocks))).tolist(),
                      "act_rms": (0.5 + 0.01 * np.arange(blocks)).tolist()}
            if gates:
                record["gate/transform"] = (0.004 * np.exp(i / 10 * np.linspace(0, 1, blocks))).tolist()
            f.write(json.dumps(record) + "\n")


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_report_writes_every_figure(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    write_metrics(run)
    write_depth(run)
    out = tmp_path / "figures"
    assert main([str(run), "--out", str(out)]) == 0
    written = {p.name for p in out.iterdir()}
    assert written == {"loss.png", "accuracy.png"} | DEPTH_FIGURES
    for path in out.iterdir():
        width, height = png_size(path)
        assert width >= 600 and height >= 300
    assert "wrote" in capsys.readouterr().out


def test_report_goes_to_run_dir_report_by_default_and_through_the_cli(tmp_path):
    write_depth(tmp_path)
    assert cli.main(["report", str(tmp_path)]) == 0
    assert {p.name for p in (tmp_path / "report").iterdir()} == DEPTH_FIGURES


def test_missing_pieces_are_skipped_with_a_note(tmp_path, capsys):
    write_depth(tmp_path, gates=False)  # a residual net: no gates; and no metrics.csv
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gates.png: this model has no gates" in out
    assert "no metrics.csv" in out
    assert not (tmp_path / "report" / "gates.png").exists()
    assert (tmp_path / "report" / "grad_norm.png").exists()


def test_a_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2  # exists, but holds nothing to draw
    assert "nothing to draw" in capsys.readouterr().err


def test_depth_file_after_a_resume_keeps_the_later_line_and_survives_a_cut_line(tmp_path):
    path = tmp_path / "depth.jsonl"
    path.write_text(
        json.dumps({"step": 0, "grad_norm": [1.0, 2.0]}) + "\n"
        + json.dumps({"step": 10, "grad_norm": [9.0, 9.0]}) + "\n"  # from the session that crashed
        + json.dumps({"step": 10, "grad_norm": [3.0, None]}) + "\n"  # redone after the resume
        + '{"step": 20, "grad_no'  # cut short by the crash
    )
    records = read_depth_file(path)
    assert [r["step"] for r in records] == [0, 10]
    history = DepthHistory.from_records(records)
    np.testing.assert_array_equal(history.arrays["grad_norm"][1], [3.0, np.nan])


@pytest.mark.slow
def test_report_of_a_real_run(tmp_path):
    """A short `deepres fit` with the diagnostics on, then `deepres report` on its run directory."""
    from test_diagnostics import deepres_fit  # the same launcher as the end-to-end wandb tests

    done = deepres_fit(tmp_path, "--run.root", str(tmp_path), "--run.name", "tiny", "--model.depth", "6",
                       "--trainer.max_steps", "12", "--trainer.enable_progress_bar", "false",
                       "--diagnostics.every_n_steps", "2", "--wandb.enabled", "false")
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "tiny"
    assert not (run / "wandb").exists()
    assert [r["step"] for r in read_depth_file(run / "depth.jsonl")] == list(range(0, 12, 2))
    assert main([str(run)]) == 0
    assert {"loss.png", "accuracy.png"} | DEPTH_FIGURES <= {p.name for p in (run / "report").iterdir()}
