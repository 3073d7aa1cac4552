"""The evidence scripts run end to end with tiny settings (`--quick`) and write their
table (CSV + Markdown) and figure (PNG); the real numbers come from scripts/tools/make_results.sh.

Each script's `main(argv)` runs in this process (scripts/ on sys.path, as when a script is run
directly) so that torch and Lightning are imported once for the whole file."""

from __future__ import annotations

import csv
import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_script(name: str, out_dir: Path, *extra: str):
    for folder in (SCRIPTS, *(SCRIPTS / kind for kind in ("benchmarks", "repro", "tools"))):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    module = importlib.import_module(name)
    assert module.main(["--quick", "--out-dir", str(out_dir), *extra]) == 0
    return module


def read_outputs(out_dir: Path, stem: str) -> tuple[list[dict], str]:
    """The script's CSV rows and Markdown table, after checking its PNG is a real image and its
    summary rows are table rows of five cells."""
    png = (out_dir / f"{stem}.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000
    markdown = (out_dir / f"{stem}.md").read_text()
    assert f"](results/{stem}.png)" in markdown  # the figure link RESULTS.md needs
    assert "torch threads 1" in markdown and "load average" in markdown  # where it was measured
    for row in (out_dir / f"{stem}_summary.md").read_text().splitlines():  # rows of RESULTS.md's summary
        assert row.startswith("| ") and row.endswith(" |") and row.count(" | ") == 4, row
    with open(out_dir / f"{stem}.csv") as f:
        return list(csv.DictReader(f)), markdown


def test_error_flow(tmp_path):
    run_script("repro_error_flow", tmp_path)
    rows, markdown = read_outputs(tmp_path, "error_flow")
    by = {(r["net"], int(r["depth"])): r for r in rows}
    assert float(by["ResNet (residual)", 30]["ratio_fp32"]) == pytest.approx(1.0, abs=1e-5)
    for depth in (10, 30):  # a coupled Highway net carries the error with (1 - sigmoid(b))^(L-1)
        for net in ("Highway, bias −3", "Highway, bias −ln(L−1)−1 (default)"):
            r = by[net, depth]
            assert 10 ** float(r["log10_ratio"]) == pytest.approx(float(r["predicted_carry_product"]), rel=0.05)
    # He-initialised plain layers keep the error's size at shallow depth (PyTorch's default init: 3e-4 at 10);
    # it vanishes only deeper (the full run: 0.06 at 100, 5.6e-10 at 1000)
    assert 0.1 < 10 ** float(by["plain", 10]["log10_ratio"]) < 10
    assert "| **plain** |" in markdown


def test_highway_sweep(tmp_path):
    run_script("repro_highway_sweep", tmp_path)
    rows, markdown = read_outputs(tmp_path, "highway_sweep")
    assert {r["net"] for r in rows} == {"plain", "highway"}
    for r in rows:  # one epoch on the digits already beats chance (ln 10 = 2.3)
        assert 0 < float(r["final_train_loss"]) < math.log(10)
        assert float(r["val_acc"]) > 0.3
    assert "| 2 |" in markdown and "plain ÷ highway" in markdown


def test_lstm_adding(tmp_path):
    run_script("repro_lstm_adding", tmp_path)
    rows, markdown = read_outputs(tmp_path, "lstm_adding_T20")
    assert len(rows) == 4  # 1997, 1999 (+1), 1999 (forget bias auto), plain RNN: one seed each
    for r in rows:  # the script's own count on the 2,560 test sequences agrees with deepres's metric
        assert int(r["test_sequences"]) == 2560
        assert float(r["success_rate"]) == pytest.approx(float(r["deepres_val_success_rate"]), abs=1e-6)
    assert "plain tanh RNN" in markdown and "forget bias ln T + 1 (auto)" in markdown


def test_bench_overhead(tmp_path):
    run_script("bench_overhead", tmp_path)
    rows, markdown = read_outputs(tmp_path, "overhead")
    assert {r["side"] for r in rows} == {"deepres", "deepres, no wandb", "hand"}
    assert all(float(r["ms_per_step"]) > 0 for r in rows)
    assert markdown.count("≤ 1.03 |") >= 2 and "no wandb" in markdown  # both ratios against the target


def test_bench_optimizer(tmp_path):
    # the script itself checks that deepres's builder chose the fused kernel for every group
    run_script("bench_optimizer", tmp_path)
    markdown = (tmp_path / "bench_optimizer.md").read_text()
    rows = [line.split(" | ") for line in markdown.splitlines() if line.startswith(("| sgd", "| adamw", "| adam "))]
    assert [r[0] for r in rows] == ["| sgd", "| adamw", "| adam"]
    assert all(int(r[1]) == 400 and float(r[2]) > 0 and float(r[3]) > 0 for r in rows)  # the default job's tensors
    assert "torch threads 1" in markdown and "load average" in markdown


def test_bench_model_cost(tmp_path):
    # main() itself refuses to time anything unless deepres's resnet50 with torchvision's weights
    # gives torchvision's outputs
    run_script("bench_model_cost", tmp_path)
    rows, markdown = read_outputs(tmp_path, "model_cost")
    assert len(rows) == 2 and all(float(r["deepres_s"]) > 0 for r in rows)
    deepres_row = next(line for line in markdown.splitlines() if line.startswith("| deepres ResNet-50 ÷"))
    assert "| 1.000 |" in deepres_row  # the same forward FLOPs as torchvision


def test_bench_cpu_efficiency(tmp_path):
    run_script("bench_cpu_efficiency", tmp_path)
    rows, markdown = read_outputs(tmp_path, "cpu_efficiency")
    for r in rows:
        flops, seconds, peak = (float(r[k]) for k in ("flops_per_step", "s_per_step", "matmul_peak_flops"))
        assert flops > 1e8 and seconds > 0 and peak > 1e9
        assert flops / seconds < 2 * peak  # no job outruns the machine
    assert "≥ 0.5" in markdown


def test_make_results_assemble_pastes_fragments(tmp_path):
    (tmp_path / "a.md").write_text("### A\n\n| x |\n")
    results = tmp_path / "RESULTS.md"
    results.write_text("intro\n<!-- begin a.md -->\nold\n<!-- end a.md -->\noutro\n")
    env = {**os.environ, "OUT_DIR": str(tmp_path), "RESULTS": str(results), "PYTHON": sys.executable}
    subprocess.run([str(SCRIPTS / "tools" / "make_results.sh"), "--assemble"], env=env, check=True, capture_output=True)
    assert results.read_text() == "intro\n<!-- begin a.md -->\n### A\n\n| x |\n<!-- end a.md -->\noutro\n"

    results.write_text("<!-- begin missing.md -->\n<!-- end missing.md -->\n")
    done = subprocess.run([str(SCRIPTS / "tools" / "make_results.sh"), "--assemble"], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "no missing.md" in done.stderr


def test_depth_init_sweep_and_render(tmp_path):
    module = run_script("repro_depth_init", tmp_path, "--nets", "default", "rezero")
    rows, markdown = read_outputs(tmp_path, "depth_init")
    assert {(r["net"], int(r["depth"])) for r in rows} == {("highway (default bias)", 10), ("residual + rezero", 10)}
    by = {r["net"]: r for r in rows}
    assert float(by["residual + rezero"]["error_flow_ratio"]) == pytest.approx(1.0, abs=1e-6)  # identity blocks
    assert 0.3 < float(by["highway (default bias)"]["error_flow_ratio"]) < 1.0  # the carry product ≈ e^(−1/e)
    assert all(float(r["final_train_loss"]) < 2.0 for r in rows)  # 20 steps move the loss off ln 10
    assert "| highway (default bias) | " in markdown and "| plain + He | – |" in markdown
    # the table, summary and figure are rebuilt from the CSV alone
    (tmp_path / "depth_init_summary.md").unlink()
    assert module.main(["--render-only", "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "depth_init.md").read_text() == markdown
    assert "| Error flow at init, depth-aware presets, L = 10 |" in (tmp_path / "depth_init_summary.md").read_text()


def test_depth_transfer_sweep_resumes_and_matches_single_runs(tmp_path):
    module = run_script("sweep_depth_transfer", tmp_path)
    rows, markdown = read_outputs(tmp_path, "depth_transfer")
    # quick: 2 depths × 2 members × 2 switches × 2 learning rates, 4 steps each
    assert len(rows) == 16 and {int(r["depth"]) for r in rows} == {3, 6}
    assert "| highway | completep | 6 | 2 | " in markdown
    # resumable: finished runs are skipped, a missing one is run again
    csv_path = tmp_path / "depth_transfer.csv"
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines[:-1]) + "\n")
    assert module.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    again = csv_path.read_text().splitlines()
    assert len(again) == len(lines) and again[-1].split(",")[:6] == lines[-1].split(",")[:6]
    # the multi-stream member runs one lr at a time, through the same resumable loop and table
    assert module.main(["--quick", "--members", "mhc", "--out-dir", str(tmp_path)]) == 0
    rows, markdown = read_outputs(tmp_path, "depth_transfer")
    assert len([r for r in rows if r["member"] == "mhc"]) == 8 and "| mhc | completep | 6 | 2 | " in markdown
    # the side-by-side runs are the single runs of the default job's optimizer, copy for copy
    for member in (m for m in module.MEMBERS if m not in module.MULTI_STREAM):
        single = module.train_one(member, "completep", 4, 0.32, 6, 0)
        together = module.train_side_by_side(member, "completep", 4, [0.04, 0.32], 6, 0)[1]
        assert together["final_train_loss"] == pytest.approx(single["final_train_loss"], rel=1e-4)
        assert together["val_acc"] == pytest.approx(single["val_acc"], abs=1e-6)


def test_digits_shards_are_read_by_the_shard_loader(tmp_path):
    """The shards the shard-fed chaos run uses: 1,500 training samples in 5 shards, 297 for validation, 10 classes."""
    from deepres.data.shards import ShardDataModule

    sys.path.insert(0, str(SCRIPTS / "repro"))
    assert importlib.import_module("digits_shards").main([str(tmp_path)]) == 0
    data = ShardDataModule(root=str(tmp_path / "shards"), batch_size=64, num_workers=0, image_size=32,
                           eval_resize=32, recipe="cifar")
    data.setup("fit")
    assert data.num_classes == 10 and len(data.train_dataloader()) == 1500 // 64
    labels = torch.cat([y for x, y in data.val_dataloader() if x.shape[1:] == (3, 32, 32)])
    assert len(labels) == 297 and set(labels.tolist()) == set(range(10))
