"""Long time lags (Hochreiter & Schmidhuber 1997, Experiment 4): the adding problem, 1997 vs 1999 LSTM vs plain RNN.

    .venv/bin/python scripts/repro_lstm_adding.py                 # T = 100, 4 cells x 3 seeds x 10000 steps: ~30 min on 2 quiet cores
    .venv/bin/python scripts/repro_lstm_adding.py --seq-len 1000  # T = 1000
    .venv/bin/python scripts/repro_lstm_adding.py --quick         # smoke test

Paper: the adding problem is solved at T = 100, 500, 1000: at the sequence end the absolute error
is below 0.04 on all but at most 1 of 2,560 test sequences; a plain RNN fails at these lags.

Every run is `deepres fit --config configs/lstm_adding_T100_<cell>.yaml` (the 1999 config with
`--model.cell rnn` for the RNN, `--model.forget_bias auto` for the 1999 cell whose forget gate starts at
ln T + 1): hidden size 64 for all four, Adam lr 1e-3, batch 32,
gradient clipping 1.0, with `--trainer.max_steps N` and `--data.train_size 32·N` so that every
training sequence is new (as in the paper) and validation on the 2,560 held-out sequences runs every
`--val-every` steps. The reported success rate is recomputed from the final checkpoint on those 2,560
sequences (|prediction − target| < 0.04, the paper's criterion) and must equal deepres's own
val/success_rate. Runs go to --jobs worker processes with one torch thread each.
Writes lstm_adding_T<T>.{csv,md,png} to --out-dir.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CELLS = {  # label: (config cell, extra deepres fit arguments)
    "LSTM 1997 (no forget gate)": ("1997", []),
    "LSTM 1999 (forget gate, bias +1)": ("1999", []),
    "LSTM 1999, forget bias ln T + 1 (auto)": ("1999", ["--model.forget_bias", "auto"]),
    "plain tanh RNN": ("1999", ["--model.cell", "rnn"]),
}
SHORT = {cell: name for cell, name in zip(CELLS, ("1997", "1999", "1999-auto", "rnn"), strict=True)}
TOLERANCE = 0.04  # Hochreiter & Schmidhuber 1997, Sec. 5.4
PAPER_SOLVED = 2559 / 2560  # "all but at most 1 of 2,560 test sequences"
from evidence import command_line, run_all, write_csv  # noqa: E402  (scripts/ is on sys.path)

from deepres.training.run_dir import environment  # noqa: E402


def config_for(seq_len: int, cell: str) -> Path:
    """The repository's config of that cell at that T, or the T = 100 one with --data.seq_len."""
    path = REPO / "configs" / f"lstm_adding_T{seq_len}_{cell}.yaml"
    return path if path.exists() else REPO / "configs" / f"lstm_adding_T100_{cell}.yaml"


def run_one(job: dict) -> dict:
    """One `deepres fit`; the final success rate recomputed from its last checkpoint."""
    import torch

    from deepres.data import SequenceDataModule
    from deepres.training import SequenceModule
    from deepres.training.cli import main as deepres_main

    config_cell, extra = CELLS[job["cell"]]
    argv = ["fit", "--config", str(config_for(job["seq_len"], config_cell)), *extra,
            "--data.seq_len", str(job["seq_len"]), "--data.train_size", str(32 * job["steps"]),
            "--trainer.max_steps", str(job["steps"]), "--trainer.max_epochs", "1",
            "--trainer.val_check_interval", str(job["val_every"]),
            "--seed_everything", str(job["seed"]), "--data.seed", str(job["seed"]),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--run.root", job["root"], "--run.name", job["name"]]
    start = time.perf_counter()
    cpu_start = time.process_time()
    log_path = Path(job["root"]) / f"{job['name']}.log"
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = deepres_main(argv)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if code != 0:
        raise RuntimeError(f"deepres fit {' '.join(argv)} exited with {code}; see {log_path}:\n{log_path.read_text()[-2000:]}")
    run_dir = Path(job["root"]) / job["name"]
    module = SequenceModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu").eval()
    data = SequenceDataModule(task="adding", seq_len=job["seq_len"], seed=job["seed"])
    data.setup("validate")
    errors = []
    with torch.no_grad():
        for x, y in data.val_dataloader():
            errors.append((module(x) - y).abs().squeeze(1))
    errors = torch.cat(errors)
    curve = read_curve(run_dir / "metrics.csv")
    return {"cell": job["cell"], "seq_len": job["seq_len"], "seed": job["seed"], "steps": job["steps"],
            "test_sequences": len(errors), "solved": int((errors < TOLERANCE).sum()),
            "success_rate": float((errors < TOLERANCE).float().mean()), "mean_abs_error": float(errors.mean()),
            "deepres_val_success_rate": curve[-1][1] if curve else float("nan"),
            "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1), "curve": curve}


def read_curve(path: Path) -> list[tuple[int, float]]:
    """(step, val/success_rate) rows of a run's metrics.csv."""
    with open(path) as f:
        return [(int(r["step"]) + 1, float(r["val/success_rate"])) for r in csv.DictReader(f) if r.get("val/success_rate")]


def write_table(path: Path, rows: list[dict], seq_len: int, header: str) -> None:
    lines = [
        f"### Long time lags: the adding problem at T = {seq_len} (Hochreiter & Schmidhuber 1997)",
        "",
        header,
        "",
        "Success rate = share of the 2,560 test sequences with |prediction − target| < 0.04 at the sequence end",
        "(mean ± std over seeds; each seed's value in brackets). Paper: the LSTM solves T = 100 and 1000 (all but",
        "≤ 1 of 2,560 sequences, success ≥ 0.9996); a plain RNN fails.",
        "",
        "| net (hidden 64) | success rate | seeds solved (≥ 2559/2560) | mean abs. error | paper | verdict |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for cell in CELLS:
        sel = [r for r in rows if r["cell"] == cell]
        if not sel:
            continue
        rates = [r["success_rate"] for r in sel]
        spread = statistics.stdev(rates) if len(rates) > 1 else 0.0
        solved = sum(r["solved"] >= r["test_sequences"] - 1 for r in sel)
        mae = statistics.mean(r["mean_abs_error"] for r in sel)
        paper = "fails" if cell == "plain tanh RNN" else "solved (≥ 0.9996)"
        if cell == "plain tanh RNN":
            verdict = "**as paper** (fails)" if solved == 0 else "**differs** (solved)"
        else:
            verdict = "**met**" if solved == len(sel) else f"**not met** ({solved}/{len(sel)} seeds)"
        lines.append(f"| {cell} | {statistics.mean(rates):.4f} ± {spread:.4f} "
                     f"({', '.join(f'{r:.4f}' for r in rates)}) | {solved}/{len(sel)} | {mae:.3f} | {paper} | {verdict} |")
    lines += ["", f"![adding problem T = {seq_len}](results/lstm_adding_T{seq_len}.png)", ""]
    path.write_text("\n".join(lines))


def write_summary(path: Path, rows: list[dict], seq_len: int) -> None:
    """This result's rows of the summary table in docs/RESULTS.md (result | measured | target | paper | verdict)."""
    lines = []
    for cell in CELLS:
        sel = [r for r in rows if r["cell"] == cell]
        if not sel:
            continue
        rates = [r["success_rate"] for r in sel]
        solved = sum(r["solved"] >= r["test_sequences"] - 1 for r in sel)
        spread = statistics.stdev(rates) if len(rates) > 1 else 0.0
        if cell == "plain tanh RNN":
            target, paper, verdict = "fails", "fails", "as paper" if solved == 0 else "**differs** (solved)"
        else:
            target, paper = "≥ 0.9996 (≤ 1 of 2,560 wrong)", "solved"
            verdict = "met" if solved == len(sel) else f"**not met** ({solved}/{len(sel)} seeds, {sel[0]['steps']} steps)"
        lines.append(f"| Adding problem T = {seq_len}, {cell}: success rate | {statistics.mean(rates):.3f} ± {spread:.3f} | "
                     f"{target} | {paper} | {verdict} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict], seq_len: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for cell, colour in zip(CELLS, ("tab:green", "tab:blue", "tab:purple", "tab:red"), strict=True):
        for i, r in enumerate(r for r in rows if r["cell"] == cell):
            steps, rates = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
            ax.plot(steps, rates, color=colour, alpha=0.8, label=cell if i == 0 else None)
    ax.axhline(PAPER_SOLVED, color="grey", ls=":", label="paper's criterion (≤ 1 of 2,560 wrong)")
    ax.set_xlabel("training step (batch 32)")
    ax.set_ylabel("success rate on 2,560 test sequences")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Adding problem, T = {seq_len}: one line per seed")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=100, help="T, the time lag")
    parser.add_argument("--steps", type=int, default=10000, help="training steps of batch 32 per run")
    parser.add_argument("--val-every", type=int, default=250, help="validate on the 2,560 test sequences every N steps")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cells", nargs="+", default=list(CELLS), choices=list(CELLS))
    parser.add_argument("--jobs", type=int, default=2, help="parallel worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per worker")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/results"))
    parser.add_argument("--quick", action="store_true", help="smoke test: T = 20, 4 steps, one seed, one job")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_len, args.steps, args.val_every, args.seeds, args.jobs = 20, 4, 2, [0], 1
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the workers
    # dozens of short runs: no wandb run for each unless asked for (WANDB_MODE=offline/online)
    os.environ.setdefault("WANDB_MODE", "disabled")
    env = environment(args.threads)
    print(env, flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lstm_adding_") as root:
        # the slow cells first, so that the pool does not end on one long run
        jobs = [{"cell": cell, "seq_len": args.seq_len, "seed": s, "steps": args.steps, "val_every": args.val_every,
                 "root": root, "name": f"{SHORT[cell]}-s{s}"}
                for cell in args.cells for s in args.seeds]
        rows = []
        for row in run_all(run_one, jobs, args.jobs, args.threads):
            rows.append(row)
            print(f"{row['cell']:34s} seed {row['seed']}: success {row['success_rate']:.4f} "
                  f"({row['solved']}/{row['test_sequences']}), deepres val/success_rate "
                  f"{row['deepres_val_success_rate']:.4f}, {row['seconds']:.0f} s ({row['cpu_seconds']:.0f} s CPU)",
                  flush=True)
    seconds = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"lstm_adding_T{args.seq_len}"
    write_csv(args.out_dir / f"{stem}.csv", rows, skip=["curve"])  # the curves are in the figure
    command = command_line("repro_lstm_adding.py", argv)
    per_run = statistics.mean(r["cpu_seconds"] for r in rows)
    header = (f"`{command}` — {len(rows)} runs of `deepres fit` (T = {args.seq_len}, {args.steps} steps of batch 32 = "
              f"{32 * args.steps:,} fresh training sequences each), seeds {args.seeds} ({len(args.seeds)} trials per "
              f"cell); {args.jobs} worker processes, {seconds / 60:.1f} min ({per_run:.0f} CPU s per run on average). "
              f"{env}.")
    write_table(args.out_dir / f"{stem}.md", rows, args.seq_len, header)
    write_summary(args.out_dir / f"{stem}_summary.md", rows, args.seq_len)
    plot(args.out_dir / f"{stem}.png", rows, args.seq_len)
    print(f"wrote {args.out_dir}/{stem}.csv, {stem}.md, {stem}.png in {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
