"""What the evidence scripts share: running `deepres fit` jobs in worker processes, writing raw rows."""

from __future__ import annotations

import argparse
import contextlib
import csv
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any


def quiet_lightning(*more: str) -> None:
    """Warnings off and Lightning's loggers (and `more`) at ERROR: many short fits share one terminal."""
    import lightning.pytorch  # noqa: F401  (sets its loggers to INFO on import: quiet them after)

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", *more):
        logging.getLogger(name).setLevel(logging.ERROR)


def init_worker(threads: int) -> None:
    """One torch thread count per process, and quiet loggers."""
    import torch

    torch.set_num_threads(threads)
    quiet_lightning("deepres")


def run_all(run_one: Callable[[dict], dict], jobs: list[dict], workers: int, threads: int) -> Iterator[dict]:
    """run_one(job) for every job, results in job order, from `workers` spawned processes (1: this one)."""
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=init_worker,
                                 initargs=(threads,)) as pool:
            yield from pool.map(run_one, jobs)
    else:
        init_worker(threads)
        yield from map(run_one, jobs)


def add_standard_arguments(parser: argparse.ArgumentParser, quick: str,
                           threads: str = "torch intra-op threads") -> None:
    """The options every evidence script takes: --threads (1), --out-dir (docs/results) and --quick,
    whose help says what the smoke test shrinks (`quick`)."""
    parser.add_argument("--threads", type=int, default=1, help=threads)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/results"))
    parser.add_argument("--quick", action="store_true", help=f"smoke test: {quick}")


def fit_logged(argv: list[str], log_path: Path) -> float:
    """Run `deepres <argv>` in this process with its output in `log_path` (a worker's output would
    interleave with the others'); return its seconds, or raise with the log's tail if it failed."""
    from deepres.training.cli import main as deepres_main

    start = time.perf_counter()
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = deepres_main(argv)
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"deepres {' '.join(argv)} exited with {code}; see {log_path}:\n{log_path.read_text()[-2000:]}")
    return seconds


def write_csv(path: Path, rows: list[dict[str, Any]], skip: Iterable[str] = ()) -> None:
    fields = [k for k in rows[0] if k not in set(skip)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_results_csv(out_dir: Path, stem: str, rows: list[dict[str, Any]], script: str,
                      argv: list[str] | None) -> str:
    """Write `rows` to `out_dir/<stem>.csv` (creating the folder) and return the command line that
    made them, for the header of the tables written beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / f"{stem}.csv", rows)
    return command_line(script, argv)


def command_line(script: str, argv: list[str] | None) -> str:
    """How this run was started, as RESULTS.md shows it (scripts/benchmarks/bench_*.py, scripts/repro/repro_*.py,
    scripts/tools/*.py)."""
    here = Path(__file__).resolve().parent
    folder = next((kind for kind in ("benchmarks", "repro", "tools") if (here / kind / script).exists()), "tools")
    return " ".join(["python", f"scripts/{folder}/{script}", *(argv if argv is not None else sys.argv[1:])])


def label_trial_axes(ax, xlabel: str, ylabel: str, title: str, **title_style) -> None:
    """Label a per-trial timing plot: its y axis from zero (a time), a light grid and the legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, **title_style)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig, path: Path) -> None:
    """Lay out, write at the resolution every figure in docs/results has, and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def rss_bytes() -> int:
    """Resident memory of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since it started or since reset_peak_rss (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss() -> None:
    """Set the peak resident memory back to the current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
