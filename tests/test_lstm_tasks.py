"""The 1997 benchmark's generators against hand-checked examples, and its criteria and stopping rules on
constructed outputs that pass and fail them."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

from deepres.data import SequenceDataModule
from deepres.data import lstm_tasks as lt
from deepres.errors import ConfigError

REBER = "BTBTSSXXTVVETE"  # outer T; inner B T S S X X T V V E; outer T; E (walked by hand through the graph)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def repro_script():
    scripts = Path(__file__).resolve().parent.parent / "scripts" / "repro"
    if str(scripts) not in sys.path:
        sys.path.insert(0, str(scripts))
    return importlib.import_module("repro_lstm_1997")


def test_a_hand_walked_reber_string_is_accepted_and_corruptions_are_not():
    assert lt.embedded_reber_accepts(REBER)
    assert not lt.embedded_reber_accepts("BTBTSSXXTVVEPE")  # the outer symbol is not repeated
    assert not lt.embedded_reber_accepts("BTBTXXETE")  # the inner walk stops in state 3, not at the exit
    assert not lt.embedded_reber_accepts("BTBTSVXXTVVETE")  # V does not leave state 2


def test_reber_next_symbol_sets_by_hand():
    assert lt.reber_next_sets(REBER) == ["TP", "B", "TP", "SX", "SX", "SX", "XS", "TV", "TV", "PV", "E", "T", "E"]
    x, y = lt.reber_example(REBER)
    assert x.shape == y.shape == (13, 7)
    assert x.argmax(dim=1).tolist() == [lt.REBER_SYMBOLS.index(c) for c in REBER[:-1]]
    assert y.sum(dim=1).tolist() == [2, 1, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1]


def test_generated_reber_strings_are_in_the_grammar_with_both_outer_symbols():
    g = gen()
    strings = [lt.embedded_reber_string(g) for _ in range(200)]
    assert all(lt.embedded_reber_accepts(s) for s in strings)
    assert {s[1] for s in strings} == {"T", "P"}
    assert {s[3] for s in strings} == {"T", "P"}  # both inner branches


def test_reber_test_strings_are_never_training_strings():
    # The four shortest strings (each drawn with probability 1/16) and the hand-walked one are training
    # strings; the paper tests only on strings not used in training.
    train = ["BTBTXSETE", "BPBTXSEPE", "BTBPVVETE", "BPBPVVEPE", REBER]
    test = lt.reber_test_strings(train, 256, gen())
    assert len(test) == 256 and all(lt.embedded_reber_accepts(s) for s in test)
    assert not set(test) & set(train)
    repro_train, repro_test = repro_script().reber_sets(gen())
    assert len(repro_train) == len(repro_test) == 256 and not set(repro_train) & set(repro_test)


def test_reber_criterion_needs_the_possible_symbols_on_top_at_every_step():
    _, y = lt.reber_example(REBER)
    good = 0.2 + 0.6 * y  # possible symbols 0.8, the rest 0.2
    assert bool(lt.reber_success(good, y))
    bad = good.clone()
    bad[11, lt.REBER_SYMBOLS.index("P")] = 0.9  # the remembered outer symbol (T) is beaten by P
    assert not bool(lt.reber_success(bad, y))
    padded_y = torch.cat([y, torch.full((3, 7), -1.0)])  # padding steps are not judged
    assert bool(lt.reber_success(torch.cat([good, torch.zeros(3, 7)]), padded_y))


def test_noise_free_and_no_local_regularities_sequences():
    p = 6
    x, nxt = lt.noise_free_sequence(p, gen())
    symbols = x.argmax(dim=1).tolist()
    first = symbols[0]
    assert first in (p - 1, p) and symbols[1:] == list(range(p - 1))
    assert nxt.tolist() == [*range(p - 1), first]
    x, nxt = lt.no_local_regularities_sequence(p, gen(3))
    symbols = x.argmax(dim=1).tolist()
    assert x.shape == (p, p + 1) and nxt[-1] == symbols[0] and all(s < p - 1 for s in symbols[1:])
    firsts = {lt.noise_free_sequence(p, gen(s))[1][-1].item() for s in range(20)}
    assert firsts == {p - 1, p}


def test_very_long_lag_trigger_structure():
    q, p, k = 10, 4, 3
    for seed in range(10):
        x, c = lt.very_long_lag_sequence(q, p, gen(seed), extra=k)
        s = x.argmax(dim=1).tolist()
        assert x.shape == (q + k + 3, p + 4)
        assert s[0] == p + 1 and s[1] == p + 2 + int(c)  # b, then x (class 0) or y (class 1)
        assert s[-1] == p and s.count(p) == 1  # the trigger e only at the end
        assert all(a < p for a in s[2:-1])  # only distractors in between
    extras = [lt.geometric_extra(gen(s)) for s in range(3000)]
    assert 8.5 < sum(extras) / len(extras) < 9.5  # mean 9: sequences of mean length q + 13 (min q + 4)


def test_max_error_criterion():
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = torch.tensor([[0.85, 0.1], [0.3, 0.9]])
    assert lt.max_error_success(out, target, 0.2).tolist() == [True, False]
    assert lt.max_error_success(out, target, 0.25).tolist() == [True, False]
    assert lt.max_error_success(out, target, 0.31).tolist() == [True, True]


def test_two_sequence_classes_lengths_and_noise():
    T, n = 100, 3
    for seed in range(20):
        x, target, clean = lt.two_sequence(T, n, gen(seed))
        assert T <= len(x) <= T + T // 10 and x.shape[1] == 1
        info = x[:n, 0]
        assert info.abs().eq(1).all() and info.unique().numel() == 1
        assert target.item() == clean.item() == (1.0 if info[0] > 0 else 0.0)
    tails = torch.cat([lt.two_sequence(T, n, gen(s))[0][n:, 0] for s in range(50)])
    assert abs(tails.var().item() - 0.2) < 0.02  # variance 0.2 after the informative elements
    x, _, _ = lt.two_sequence(T, n, gen(1), noisy_inputs=True)
    assert not x[:n, 0].abs().eq(1).all()  # 3b: noise on the informative elements too
    targets = [lt.two_sequence(T, 1, gen(s), noisy_inputs=True, noisy_targets=True) for s in range(200)]
    assert {round(c.item(), 6) for _, _, c in targets} == {0.2, 0.8}
    noise = torch.stack([t - c for _, t, c in targets])
    assert abs(noise.var().item() - 0.1) < 0.03


def test_repro_rows_3b_noise_the_inputs_and_3c_only_the_targets():
    """3b: noise on the N informative inputs, targets 1 / 0; 3c: 3a's clean ±1 inputs, targets 0.2 / 0.8
    plus noise (the paper's Task 3c is "like in Task 3a" except for the targets)."""
    rows = repro_script().ROWS
    x, target, clean = rows["3c-T100-N3"].draw(64, gen())
    assert x[:, :3, 0].abs().eq(1).all()
    assert {round(c, 6) for c in clean.flatten().tolist()} == {0.2, 0.8} and not torch.equal(target, clean)
    x, target, clean = rows["3b-T100-N3"].draw(64, gen())
    assert not x[:, :3, 0].abs().eq(1).all() and torch.equal(target, clean)
    assert set(clean.flatten().tolist()) == {0.0, 1.0}


def test_two_sequence_criteria_st1_st2():
    clean = torch.tensor([1.0, 0.0] * 128)
    st = lt.TWO_SEQUENCE_CRITERIA["3a"]
    assert st(clean + 0.005, clean) == (True, True)
    assert st(clean + 0.05, clean) == (True, False)  # all within 0.2, mean 0.05 ≥ 0.01
    off = clean.clone()
    off[0] = 0.7
    assert st(off, clean) == (False, False)  # one of 256 off by 0.3
    noisy = clean + 0.01
    noisy[:5] += 0.5
    assert lt.TWO_SEQUENCE_CRITERIA["3b"](noisy, clean)[0]  # 5 of 256 wrong: below 6
    noisy[5] += 0.5
    assert not lt.TWO_SEQUENCE_CRITERIA["3b"](noisy, clean)[0]
    c = torch.tensor([0.2, 0.8] * 128)
    assert lt.TWO_SEQUENCE_CRITERIA["3c"](c + 0.01, c) == (True, True)
    assert lt.TWO_SEQUENCE_CRITERIA["3c"](c + 0.02, c) == (True, False)  # mean 0.02 ≥ 0.015


def test_multiplication_target_is_the_product_of_the_marked_values():
    for seed in range(30):
        x, y = lt.multiplication_sequence(50, gen(seed))
        marked = (x[:, 1] == 1).nonzero().flatten()
        assert len(marked) == 2 and x[:, 0].min() >= 0 and x[:, 0].max() <= 1
        assert torch.isclose(y[0], x[marked[0], 0] * x[marked[1], 0])
        if marked[0] == 0:
            assert x[0, 0] == 1.0


def test_temporal_order_3_positions_and_label():
    for seed in range(30):
        x, label = lt.temporal_order_3_sequence(100, gen(seed))
        s = x.argmax(dim=1)
        assert s[0] == 6 and s[-1] == 7
        where = ((s == 4) | (s == 5)).nonzero().flatten().tolist()
        assert len(where) == 3 and 10 <= where[0] <= 20 and 33 <= where[1] <= 43 and 66 <= where[2] <= 76
        bits = [int(s[t]) - 4 for t in where]
        assert int(label) == 4 * bits[0] + 2 * bits[1] + bits[2]


def test_successive_rule_counts_from_where_the_run_began():
    rule = lt.SuccessiveRule(window=5)
    assert not rule.update([True, False, True, True])  # the run restarts after the 2nd sequence
    assert not rule.update([True])
    assert rule.update([True, True, False])  # 5 in a row: sequences 3 … 7
    assert rule.solved_after == 2
    assert rule.update([False]) and rule.solved_after == 2  # later failures do not undo it


def test_recent_window_rule_failures_and_mean_error():
    rule = lt.RecentWindowRule(window=4, max_failures=0, max_mean_error=0.01)
    assert not rule.update([True, True, True, True], [0.05, 0.0, 0.0, 0.0])  # mean 0.0125
    assert rule.update([True], [0.0])  # the 0.05 left the window
    assert rule.solved_after == 5
    lenient = lt.RecentWindowRule(window=4, max_failures=1)  # Exp. 5 with n_seq = 2
    assert not lenient.update([False, True, False, True])
    assert lenient.update([True]) and lenient.solved_after == 5


@pytest.mark.parametrize("task, args, shape, classes", [
    ("multiplication", {}, (30, 2), 0),
    ("temporal_order_3", {}, (30, 8), 8),
    ("noise_free", {}, (30, 31), 31),
    ("very_long_lag", {"p": 5}, (33, 9), 2),
    ("two_sequence", {"n_info": 3, "noisy_inputs": True}, (30, 1), 0),
])
def test_named_tasks_in_the_sequence_data_module(task, args, shape, classes):
    data = SequenceDataModule(task=task, seq_len=30, task_args=args, train_size=8, val_size=8, batch_size=4)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert data.input_shape == shape and data.num_classes == classes
    assert x.shape == (4, *shape)
    assert y.shape == ((4, 1) if classes == 0 else (4,))


def test_task_args_that_do_not_apply_are_refused():
    with pytest.raises(ConfigError, match="n_info"):
        SequenceDataModule(task="very_long_lag", seq_len=30, task_args={"n_info": 3})
    with pytest.raises(ConfigError, match="two_sequence"):
        SequenceDataModule(task="two_sequences", seq_len=30)


def test_repro_script_quick_writes_the_table(tmp_path):
    repro = repro_script()
    assert repro.main(["--quick", "--rows", "1", "3a-T100-N3", "2c-q50-p50", "--out-dir", str(tmp_path)]) == 0
    trials = repro.read_trials(tmp_path / "lstm_1997_quick_trials.jsonl")
    assert {(t["row"], t["cell"]) for t in trials} == {(r, c) for r in ("1", "3a-T100-N3", "2c-q50-p50")
                                                       for c in ("1997-ib", "1999-auto")}
    assert all(t["sequences"] == 64 and t["solved_after"][0] is None for t in trials)
    assert [len(t["solved_after"]) for t in trials if t["row"] == "3a-T100-N3"] == [2, 2]  # ST1, ST2
    table = (tmp_path / "lstm_1997_quick.md").read_text()
    assert "| 3a-T100-N3 |" in table and "27,380 / 39,850" in table and "not solved in 64" in table
