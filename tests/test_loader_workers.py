"""Loader workers survive the stop signals that reach every process of a group (Ctrl-C in a terminal, a
scheduler's SIGTERM), so the main process can finish its step and save (deepres.data.base.ignore_stop_signals)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from deepres.data.base import worker_context
from deepres.data.digits import DigitsDataModule


def _signal_workers(iterator, signum: int) -> None:
    pids = [worker.pid for worker in iterator._workers]  # torch's worker processes of this iterator
    for pid in pids:
        os.kill(pid, signum)
    time.sleep(1.0)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_deepres_loaders_workers_outlive_a_stop_signal(signum):
    data = DigitsDataModule(batch_size=64, num_workers=2)
    data.setup("fit")
    loader = data.train_dataloader()
    iterator = iter(loader)
    next(iterator), next(iterator)  # a batch from each worker: both have run their worker_init_fn
    _signal_workers(iterator, signum)
    rest = sum(1 for _ in iterator)
    assert rest == len(loader) - 2


def test_without_it_a_stop_signal_kills_the_workers_and_the_epoch():
    """The control: a stop signal, workers with the default handlers: the next batch fails. SIGTERM, whose default
    action kills; a test runner may start its workers with SIGINT ignored, and workers inherit that."""
    loader = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=2,
                        multiprocessing_context=worker_context("forkserver"))
    iterator = iter(loader)
    next(iterator), next(iterator)
    _signal_workers(iterator, signal.SIGTERM)
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        for _ in iterator:
            pass
