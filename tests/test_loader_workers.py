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


ENDS_WITH_LIVE_ITERATORS = """
from deepres.data.digits import DigitsDataModule
if __name__ == "__main__":
    dm = DigitsDataModule(batch_size=64, num_workers=2)  # persistent workers: the loader keeps its iterator
    dm.setup("fit")
    loader = dm.train_dataloader()
    print(sum(1 for _ in loader), flush=True)
    half_done = iter(loader)
    next(half_done)  # and one suspended in the middle of a pass
"""


@pytest.mark.timeout(180)
def test_a_script_that_ends_with_loader_workers_running_exits(tmp_path):
    """At exit, multiprocessing SIGTERMs daemonic children and waits for them; workers ignore SIGTERM, so deepres
    stops them through torch's own shutdown first. Without that, this script waits forever."""
    import subprocess
    import sys

    script = tmp_path / "ends.py"
    script.write_text(ENDS_WITH_LIVE_ITERATORS)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["22"]


@pytest.mark.parametrize("workers,policy", [(0, "none"), (2, "randaugment")])
def test_a_resumed_cifar_epoch_draws_the_augmentations_of_the_run_in_one_go(tmp_path, workers, policy):
    """Each training image's crop, flip and RandAugment draws come from a seed of its own (its place in the epoch),
    so the batches after a mid-epoch resume are the run in one go's, with or without workers, and loading draws
    nothing from the training process's generator."""
    from test_training import write_fake_cifar

    from deepres.data.cifar import CIFARDataModule

    data = CIFARDataModule(data_dir=str(write_fake_cifar(tmp_path)), batch_size=16, num_workers=workers,
                           auto_augment=policy, worker_start_method="fork")
    data.setup("fit")
    before = torch.get_rng_state()
    whole = list(data.train_dataloader())
    assert torch.equal(torch.get_rng_state(), before)
    resumed = data.train_dataloader()
    resumed.sampler.skip = 7 * 16  # what a checkpoint 7 batches into the epoch sets
    rest = list(resumed)
    assert len(rest) == len(whole) - 7
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, whole[7:], strict=True))
    resumed.sampler.set_epoch(1)  # another epoch: other draws
    assert not torch.equal(next(iter(resumed))[0], whole[0][0])
