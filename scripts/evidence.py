"""What the evidence scripts share: running `deepres fit` jobs in worker processes, writing raw rows."""

from __future__ import annotations

import csv
import logging
import sys
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


def write_csv(path: Path, rows: list[dict[str, Any]], skip: Iterable[str] = ()) -> None:
    fields = [k for k in rows[0] if k not in set(skip)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def command_line(script: str, argv: list[str] | None) -> str:
    """How this run was started, as RESULTS.md shows it."""
    return " ".join(["python", f"scripts/{script}", *(argv if argv is not None else sys.argv[1:])])


def save_figure(fig, path: Path) -> None:
    """Lay out, write at the resolution every figure in docs/results has, and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
