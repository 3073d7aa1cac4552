"""Long time lags (Hochreiter & Schmidhuber 1997, Experiment 6a): the temporal-order task, 1997 vs 1999 LSTM vs plain RNN.

    .venv/bin/python scripts/repro/repro_lstm_temporal_order.py           # T = 100, 4 cells x 3 seeds, paper's stopping rule:
                                                                          # ~59 CPU s per run (docs/RESULTS.md), ~12 min
    .venv/bin/python scripts/repro/repro_lstm_temporal_order.py --quick   # smoke test

The sequence holds X or Y at two random places among distractors; the class at the sequence end is
their order (XX, XY, YX, YY). Paper: solved after 31,390 training sequences (1 of 2,560 test sequences
wrong). Everything else is scripts/repro/repro_lstm_adding.py with `--task temporal_order`; see there.
Writes lstm_temporal_order_T<T>.{csv,md,png} to --out-dir.
"""

from __future__ import annotations

import sys

from repro_lstm_adding import main as repro_main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return repro_main(["--task", "temporal_order", *argv], script="repro_lstm_temporal_order.py", shown_argv=argv)


if __name__ == "__main__":
    sys.exit(main())
