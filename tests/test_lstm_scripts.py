"""The LSTM reproduction scripts end to end with tiny settings, and the paper's stopping rule."""

from __future__ import annotations

import csv
import importlib
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"


def script(name: str):
    for folder in (SCRIPTS, *(SCRIPTS / kind for kind in ("benchmarks", "repro", "tools"))):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def test_temporal_order_script(tmp_path):
    assert script("repro_lstm_temporal_order").main(["--quick", "--out-dir", str(tmp_path)]) == 0
    with open(tmp_path / "lstm_temporal_order_T20.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == {"temporal_order"} and len(rows) == 4
    for r in rows:
        assert int(r["steps"]) == 4 and r["stopped_by_rule"] == "False"  # 128 sequences: the rule cannot hold
        assert float(r["success_rate"]) == float(r["deepres_val_success_rate"])
    markdown = (tmp_path / "lstm_temporal_order_T20.md").read_text()
    assert "`python scripts/repro/repro_lstm_temporal_order.py --quick" in markdown and "cross-entropy" in markdown


class _Trainer:
    def __init__(self):
        self.global_step, self.should_stop = 0, False


class _Module:
    regression = True

    def __init__(self):
        self.net = torch.nn.Identity()


def test_stopping_rule_needs_the_whole_window_right():
    rule = script("repro_lstm_adding").PaperStoppingRule(window=64, max_mean_error=0.01)
    trainer, module = _Trainer(), _Module()
    rule.on_train_start(trainer, module)
    y = torch.full((32, 1), 0.5)
    for step, offset in enumerate([0.01, 0.05, 0.01, 0.01], start=1):  # batch 2 has a sequence 0.05 off
        trainer.global_step = step
        module.net(y + offset)  # the training forward the rule reads through its hook
        rule.on_train_batch_end(trainer, module, None, (None, y), step - 1)
        assert trainer.should_stop == (step == 4), step  # steps 2 and 3 still see the wrong batch
    assert rule.stopped_at_sequences == 128
    rule.on_train_end(trainer, module)
    assert not module.net._forward_hooks


def test_bench_lstm_script(tmp_path):
    assert script("bench_lstm").main(["--quick", "--out-dir", str(tmp_path)]) == 0
    with open(tmp_path / "bench_lstm.csv") as f:
        rows = list(csv.DictReader(f))
    speed = [r for r in rows if r["ratio"]]
    assert {(r["cell"], int(r["seq_len"])) for r in speed} == {(c, t) for c in ("1997", "1999") for t in (20, 50)}
    assert all(0.2 < float(r["ratio"]) < 5 for r in speed)  # the same kernel on both sides
    memory = {r["time_checkpoint"]: int(r["peak_bytes"]) for r in rows if r["time_checkpoint"]}
    assert memory["sqrt"] < memory["none"]  # T = 200: the state every 14 steps instead of every step
    assert (tmp_path / "bench_lstm.png").read_bytes().startswith(b"\x89PNG")
    for row in (tmp_path / "bench_lstm_summary.md").read_text().splitlines():
        assert row.startswith("| ") and row.endswith(" |") and row.count(" | ") == 4, row


def test_runs_merge_into_one_table(tmp_path):
    repro = script("repro_lstm_adding")
    for name, cell, stop in (("a", "LSTM 1997 (no forget gate)", "paper"), ("b", "plain tanh RNN", "steps")):
        assert repro.main(["--quick", "--cells", cell, "--stop", stop, "--out-dir", str(tmp_path / name)]) == 0
    assert repro.main(["--seq-len", "20", "--merge", str(tmp_path / "a"), str(tmp_path / "b"),
                       "--stem", "merged", "--out-dir", str(tmp_path / "m")]) == 0
    rows = repro.read_rows(tmp_path / "m" / "merged.csv")
    assert [r["cell"] for r in rows] == ["LSTM 1997 (no forget gate)", "plain tanh RNN"]
    assert all(len(r["curve"]) == 2 for r in rows)  # validation every 2 of 4 steps, carried through the CSV
    markdown = (tmp_path / "m" / "merged.md").read_text()
    assert "--cells 'LSTM 1997 (no forget gate)'" in markdown and "--stop steps" in markdown
    assert "](results/merged.png)" in markdown
