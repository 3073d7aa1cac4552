"""What each fault costs a run: the measurements behind docs/training.md's fault table.

    python scripts/repro/fault_costs.py --out-dir docs/results      # about 6 min on 2 cores; needs slurmctld/slurmd
                                                                    # for the SLURM rows (skipped without them)

The fault tests inject each fault into real processes (SIGKILL, Ctrl-C, SIGTERM, a full disk, a failed background
save, a corrupt last.ckpt, a killed or stopped DDP rank; on the local SLURM cluster scancel and a node set DOWN),
assert what deepres promises (the message, the checkpoint, a resume that ends at the planned step), and print one
`FAULT ...` line with what was measured: steps lost, seconds to detect or to exit. This runs those tests and
writes the lines, with the machine, to <out-dir>/fault_costs.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

from deepres.training.run_dir import environment  # noqa: E402

TESTS = ["tests/test_faults.py", "tests/test_slurm.py::test_a_node_set_down_mid_job_requeues_it_and_it_resumes_from_the_last_checkpoint",
         "tests/test_slurm.py::test_scancel_without_a_signal_checkpoints_within_the_grace_period_and_exits_cleanly",
         "tests/test_slurm.py::test_preempted_job_requeues_resumes_from_its_checkpoint_and_ends_at_the_right_step"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=REPO / "docs" / "results")
    parser.add_argument("--quick", action="store_true", help="smoke test: only the Ctrl-C and SIGTERM faults")
    args = parser.parse_args(argv)
    selection = ["tests/test_faults.py", "-k", "stop_signal_saves"] if args.quick else TESTS
    machine = environment(threads=1)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "-s", "-q", "-p", "no:cacheprovider", "--durations=0",
                           *selection], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    faults = [line.strip() for line in proc.stdout.splitlines() if line.lstrip(".").startswith("FAULT ")]
    faults = [line[line.index("FAULT "):] for line in faults]
    summary = next((line for line in reversed(proc.stdout.splitlines()) if re.search(r"\d+ passed", line)), "")
    print("\n".join(faults) or proc.stdout[-3000:])
    if proc.returncode != 0 or not faults:
        print(f"fault_costs: the fault tests failed or measured nothing (exit {proc.returncode})", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# What each fault costs a run", "",
             f"`python scripts/repro/fault_costs.py{' --quick' if args.quick else ''}`: the fault tests "
             f"({', '.join(f'`{t}`' for t in selection if t.startswith('tests/'))}) on real processes, each printing what it "
             "measured; the table in docs/training.md quotes these lines.", "", f"Machine: {machine}.", "",
             "```", *faults, "```", "", f"pytest: {summary.strip('= ')}", ""]
    (args.out_dir / "fault_costs.md").write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
