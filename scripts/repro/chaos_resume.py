"""Kill a training run again and again, resume it each time, and check it ends exactly where one run in one go ends.

    python scripts/repro/chaos_resume.py --kills 10                       # the default job, killed 10 times at random
    python scripts/repro/chaos_resume.py --kills 10 --ddp                 # the same on 2 CPU processes (DDP)
    python scripts/repro/chaos_resume.py --kill-at-steps 12 30 -- --model.depth 6 --trainer.max_epochs 2
    python scripts/repro/chaos_resume.py --kill-every 60 -- --trainer.max_epochs 600   # a kill every minute

First `deepres fit` runs uninterrupted (the reference). Then the same command runs under fire: each attempt is
killed (SIGKILL, SIGTERM or SIGINT to its whole process group, every rank at once, as a preemption or Ctrl-C
does; with --ddp also SIGKILL of rank 1 alone) at a random moment (--kills: from half the reference run's startup
to a time, or the step reached by then at the reference's speed, that spreads the kills over the training left)
or right after a chosen step (--kill-at-steps), or every attempt --kill-every seconds after it starts, and
is resumed with `--ckpt_path last` until it ends at the planned step. Both runs save `last.ckpt` every
--every-n-steps steps.

What it reports (and writes to --json):

- final parameters: the largest difference between the two runs' last.ckpt (0.0 is bit-identical);
- metrics.csv: whether every row matches (wall-clock perf/* columns left out);
- per kill: the signal, the step it landed after, the step resumed from, the steps lost, and the recovery time
  (from the kill until the resumed run has finished the first step the killed one had not: restart, loading,
  the lost steps again, and that step);
- goodput: the planned steps over the steps computed in all attempts (lost steps are computed twice), and the
  wall-clock ratio: the reference run's time over the time of all attempts (restarts and loading included).

Exit status 0 when the parameters are bit-identical and the rows match, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from deepres.training.checkpoints import find_resume_checkpoint
from deepres.training.run_dir import environment

QUIET = ["--trainer.enable_model_summary", "false", "--wandb.enabled", "false",
         "--run.progress", "lines", "--run.progress_every_n_steps", "1"]
DDP = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
STEP_LINE = re.compile(r"^\[deepres\] epoch \S+\s+step (\d+)")
SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Attempt:
    """One `deepres fit` process group; follows its progress lines (the step reached, and when)."""

    def __init__(self, cmd: list[str], log: Path, run_dir: Path) -> None:
        self.run_dir = run_dir
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        self.started = time.monotonic()
        self.log = log.open("w")
        # SIGINT as in a terminal: a harness started in the background (`... &`) would otherwise pass on the shell's
        # ignored SIGINT, and a Ctrl-C during start-up, before deepres installs its handler, would do nothing.
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True, preexec_fn=_default_sigint)
        self.steps: list[tuple[float, int]] = []  # (time, step) of every progress line
        self.first_step: int | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.write(line)
            match = STEP_LINE.match(line)
            if match:
                step = int(match[1])
                self.steps.append((time.monotonic(), step))
                if self.first_step is None:
                    self.first_step = step

    @property
    def step(self) -> int | None:
        return self.steps[-1][1] if self.steps else None

    def kill(self, how: str) -> None:
        if how == "SIGKILL-rank1":
            record = json.loads((self.run_dir / ".ranks" / "rank-1.json").read_text())
            os.kill(record["pid"], signal.SIGKILL)
        else:
            os.killpg(self.proc.pid, SIGNALS[how])

    def wait(self) -> int:
        code = self.proc.wait()
        self._reader.join()
        self.log.close()
        if code != 0:  # a Ctrl-C or SIGKILL can leave a rank or a data-loader worker of the group behind
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        return code


def fit_command(root: Path, name: str, args: list[str], resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "deepres", "fit", "--run.root", str(root), "--run.name", name, *QUIET, *args]
    if resume:
        has_checkpoint = find_resume_checkpoint(root / name)[0] is not None
        cmd += ["--ckpt_path", "last" if has_checkpoint else "auto"]  # auto: killed before its first checkpoint
    return cmd


def rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        kept = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in csv.DictReader(f)]
    return [r for r in kept if any(v for k, v in r.items() if k not in ("step", "epoch"))]


def compare(reference: Path, chaos: Path) -> dict:
    a = torch.load(reference / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    b = torch.load(chaos / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    diff = max((a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item()
               for k in a["state_dict"])
    rows_a, rows_b = rows(reference), rows(chaos)
    same_rows = sum(ra == rb for ra, rb in zip(rows_a, rows_b, strict=False))  # compared as far as both go

    def final(rs: list[dict[str, str]], key: str) -> float | None:
        values = [float(r[key]) for r in rs if r.get(key)]
        return values[-1] if values else None

    return {"steps": [a["global_step"], b["global_step"]], "max_param_diff": diff,
            "rows": [len(rows_a), len(rows_b)], "rows_identical": same_rows,
            "metrics_identical": rows_a == rows_b,
            "final_val_acc1": [final(rows_a, "val/acc1"), final(rows_b, "val/acc1")]}


def markdown(result: dict, command: str, environment_line: str) -> str:
    """The result as a docs/results page section: what ran, each kill, and the verdict."""
    lines = [f"`{command}`", "", environment_line, "",
             f"Reference (uninterrupted): {result['planned_steps']} steps in {result['reference_s']} s "
             f"({result['startup_s']} s to the first step).", "",
             "| kill | signal | after (s) | step reached | resumed from | steps lost | exit | recovery (s) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for i, k in enumerate(result["kills"], 1):
        recovery = "killed again first" if k["recovery_s"] is None else f"{k['recovery_s']:.1f}"
        lines.append(f"| {i} | {k['signal']} | {k['after_s']:.1f} | {k['step_reached']} | {k['resumes_from']} | "
                     f"{k['lost_steps']} | {k['exit_code']} | {recovery} |")
    acc = result["final_val_acc1"]
    lines += ["", f"- final parameters: largest difference to the uninterrupted run **{result['max_param_diff']}**",
              f"- metrics.csv: {result['rows_identical']} of {result['rows'][0]} rows identical "
              f"({'all' if result['metrics_identical'] else 'NOT all'}; perf/* wall-clock columns left out)",
              f"- final val/acc1: {acc[0]} uninterrupted, {acc[1]} killed and resumed",
              f"- goodput: {result['planned_steps']} useful steps / {result['steps_computed']} computed = "
              f"**{result['goodput']}**",
              f"- wall clock: {result['reference_s']} s uninterrupted, {result['chaos_s']} s over all attempts "
              f"(ratio {result['time_ratio']}; every restart loads Python, torch and the checkpoint again)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("runs/chaos"), help="where both runs go (emptied first)")
    parser.add_argument("--kills", type=int, default=10, help="kills at random moments")
    parser.add_argument("--kill-every", type=float, default=None, metavar="SECONDS",
                        help="kill every attempt this many seconds after it starts (instead of --kills)")
    parser.add_argument("--kill-at-steps", type=int, nargs="*", default=None,
                        help="instead: one kill right after each of these steps")
    parser.add_argument("--signals", nargs="*", default=None,
                        help="signals to choose from (default SIGKILL SIGTERM SIGINT, and SIGKILL-rank1 with --ddp); "
                             "with --kill-at-steps, as many as steps: used in order")
    parser.add_argument("--ddp", action="store_true", help="2 CPU processes (DDP)")
    parser.add_argument("--every-n-steps", type=int, default=10, help="run.checkpoint_every_n_steps of both runs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times and signals")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--markdown", type=Path, default=None, help="and a table of it here")
    parser.add_argument("fit_args", nargs="*", help="after --: options of `deepres fit` for both runs")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    signals = args.signals or ["SIGKILL", "SIGTERM", "SIGINT", *(["SIGKILL-rank1"] if args.ddp else [])]
    fit_args = [*(DDP if args.ddp else []), "--run.checkpoint_every_n_steps", str(args.every_n_steps),
                *args.fit_args]
    root = args.root.resolve()
    if root.exists():
        import shutil

        shutil.rmtree(root)
    root.mkdir(parents=True)
    machine = environment(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(f"# {machine}", flush=True)

    reference = Attempt(fit_command(root, "reference", fit_args, resume=False), root / "reference.log",
                        root / "reference")
    if reference.wait() != 0:
        print(f"the reference run failed: see {root / 'reference.log'}", file=sys.stderr)
        return 1
    whole_s = time.monotonic() - reference.started
    planned = reference.step or 0
    startup_s = reference.steps[0][0] - reference.started if reference.steps else 0.0
    train_s = whole_s - startup_s
    print(f"reference: {planned} steps in {whole_s:.1f} s ({startup_s:.1f} s to the first step)", flush=True)

    kills: list[dict] = []
    computed = 0
    planned_kills = args.kill_at_steps if args.kill_at_steps is not None else [None] * args.kills
    if args.kill_every is not None:
        planned_kills = [None] * 1_000_000  # as many kills as the run takes attempts
    chaos_started = time.monotonic()
    attempt_no = 0
    resume = False
    pending: dict | None = None  # the kill waiting for the next attempt to get back to its step
    while True:
        ranks = root / "chaos" / ".ranks"
        for record in ranks.glob("rank-*.json"):  # the last attempt's pids: never signal those
            record.unlink()
        attempt = Attempt(fit_command(root, "chaos", fit_args, resume), root / f"chaos-{attempt_no}.log",
                          root / "chaos")
        attempt_no += 1
        target = planned_kills[len(kills)] if len(kills) < len(planned_kills) else "none"
        in_order = args.kill_at_steps is not None and len(signals) == len(planned_kills)  # one signal per kill
        how = None if target == "none" else signals[len(kills)] if in_order else rng.choice(signals)
        # A random moment from half the startup (a kill while it loads) to one that spreads the kills left over
        # the training left: a time, and the step it corresponds to at the reference's speed, whichever comes
        # first (the speed of a shared machine varies; the kill must land before the end).
        start = find_resume_checkpoint(root / "chaos")[1] if resume else 0
        share = 2 * (planned - start) / (len(planned_kills) - len(kills) + 1)
        u = rng.random()
        delay = startup_s / 2 + u * (startup_s / 2 + train_s * share / planned) if target is None else None
        if target is None:
            target = min(planned - 1, start + max(1, round(u * share)))
        if args.kill_every is not None:  # a kill every attempt, by time alone; the last one ends before it
            how, delay, target = rng.choice(signals), args.kill_every, planned + 1
        killed_at = None
        while attempt.proc.poll() is None:
            time.sleep(0.02)
            if pending is not None and attempt.step is not None and attempt.step > pending["step_reached"]:
                pending["recovery_s"] = round(attempt.steps[-1][0] - pending["killed_at"], 2)
                pending = None
            if how is None or killed_at is not None:
                continue
            due = (delay is not None and time.monotonic() - attempt.started >= delay) or (
                attempt.step is not None and attempt.step >= target)
            if due and (how != "SIGKILL-rank1" or (ranks / "rank-1.json").exists()):
                killed_at = time.monotonic()
                attempt.kill(how)
        code = attempt.wait()
        first = attempt.first_step
        reached = attempt.step
        computed += 0 if reached is None else reached - (first - 1 if first is not None else 0)
        if pending is not None:  # killed again before it got back: count the recovery up to this kill
            pending["recovery_s"] = None
            pending = None
        if killed_at is None or code == 0:  # no kill, or one that came after the run had ended
            if code != 0:
                print(f"attempt {attempt_no} failed (exit {code}) without a kill: see its log", file=sys.stderr)
                return 1
            break  # the planned end
        saved = find_resume_checkpoint(root / "chaos")[1]
        record = {"signal": how, "after_s": round(killed_at - attempt.started, 2), "step_reached": reached or 0,
                  "resumes_from": saved, "lost_steps": max(0, (reached or 0) - saved), "exit_code": code,
                  "killed_at": killed_at, "recovery_s": None}
        kills.append(record)
        pending = record
        print(f"kill {len(kills)}: {how} after {record['after_s']} s at step {record['step_reached']}, "
              f"exit {code}; resuming from step {saved}", flush=True)
        resume = True

    chaos_s = time.monotonic() - chaos_started
    result = {"planned_steps": planned, "reference_s": round(whole_s, 1), "startup_s": round(startup_s, 1),
              "kills": kills,
              "steps_computed": computed, "goodput": round(planned / computed, 4) if computed else None,
              "chaos_s": round(chaos_s, 1), "time_ratio": round(whole_s / chaos_s, 4),
              **compare(root / "reference", root / "chaos")}
    for record in kills:
        record.pop("killed_at", None)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        command = "python scripts/repro/chaos_resume.py " + " ".join(argv if argv is not None else sys.argv[1:])
        args.markdown.write_text(markdown(result, command, machine))
    return 0 if result["max_param_diff"] == 0.0 and result["metrics_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
