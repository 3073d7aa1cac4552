"""What every in-memory deepres data module shares: deterministic, resumable, rank-aware sampling.

Lightning's own distributed sampler injection is turned off (`use_distributed_sampler: false` in
the CLI defaults) because the data modules split data across ranks themselves: the sampler below
gives rank r the samples perm[r::world] of a per-epoch permutation (padded so every rank gets the
same count, as DistributedSampler does), and after a mid-epoch resume it skips the batches the
checkpoint had already consumed. That makes a resumed run see exactly the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import multiprocessing.util  # noqa: F401  its exit function must be registered before ours
import signal
import sys
import warnings
import weakref
from collections.abc import Iterator
from multiprocessing.context import BaseContext

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from deepres.data.recipes import BatchMix
from deepres.errors import ConfigError
from deepres.lightning_compat import batches_done_in_epoch

WORKER_START_METHODS = ("forkserver", "spawn", "fork")
# imported once by the fork server, so that every worker forked from it starts without importing them
FORKSERVER_PRELOAD = ["torch", "numpy", "PIL.Image", "deepres.data.shards"]


def ignore_stop_signals(_worker_id: int) -> None:
    """`worker_init_fn` of every deepres loader: a loader worker ignores SIGINT and SIGTERM.

    Ctrl-C in a terminal and a scheduler's SIGTERM (SLURM signals every process of a job step) reach the
    workers too. A worker that dies of them takes the batch in flight with it ("DataLoader worker exited
    unexpectedly"), and the run crashes before the main process can save at the end of its step
    (deepres.training.stop_signals). The main process stops its workers when it ends; a worker whose main
    process was killed ends when its parent goes (torch's worker loop checks it); SIGKILL still ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_live_iterators: weakref.WeakSet = weakref.WeakSet()  # iterators of WorkerLoaders with workers running


def _stop_live_workers() -> None:
    """At interpreter exit, before multiprocessing's own exit function: stop the workers of every live loader
    iterator. That function SIGTERMs daemonic children and then joins them; workers ignore SIGTERM
    (`ignore_stop_signals`), so a script that ends while an iterator lives (a persistent loader, or a
    generator suspended mid-pass) would wait forever. torch's shutdown tells them to exit instead."""
    for iterator in list(_live_iterators):
        iterator._shutdown_workers()


# multiprocessing.util (imported above) registered its exit function already: ours runs before it (last in, first out)
atexit.register(_stop_live_workers)


class WorkerLoader(DataLoader):
    """torch's DataLoader whose worker processes are stopped at interpreter exit (`_stop_live_workers`)."""

    def _get_iterator(self):  # type: ignore[no-untyped-def]
        iterator = super()._get_iterator()
        if self.num_workers > 0:
            _live_iterators.add(iterator)
        return iterator


def worker_context(method: str) -> BaseContext:
    """How data-loader worker processes start (torch's DataLoader `multiprocessing_context`).

    `forkserver` (the default, and Python 3.14's default on Linux) forks workers from a small server
    process that has no threads. Plain `fork` copies a DDP rank mid-flight: gloo/NCCL and pin-memory
    threads may hold locks at that instant, and a worker that inherits a held lock waits forever, so the
    rank stalls and DDP hangs at random (pytorch#130610; Python 3.12 warns about fork in threaded
    processes). `spawn` is as safe but imports everything again in every worker.
    """
    if method not in WORKER_START_METHODS:
        raise ConfigError(f"data.worker_start_method={method!r}: choose one of {', '.join(WORKER_START_METHODS)}.")
    if method == "forkserver" and sys.platform != "linux":
        method = "spawn"  # macOS/Windows: no forkserver (macOS has it, but spawn is its default too)
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


def rank_and_world(trainer: object | None = None) -> tuple[int, int]:
    """(this process's data-parallel rank, the number of data-parallel replicas). A strategy that gives
    several processes the same batches (pipeline stages of one replica) says so in its
    `distributed_sampler_kwargs`; otherwise every process is its own replica."""
    replicas = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None)
    if replicas and torch.distributed.is_available() and torch.distributed.is_initialized():
        return int(replicas["rank"]), int(replicas["num_replicas"])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(Sampler[int]):
    """Per-epoch permutation seeded by (seed, epoch), split across ranks, able to skip ahead."""

    def __init__(self, length: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1, drop_last: bool = False,
                 draw_seeds: bool = False):
        self.length, self.shuffle, self.seed = length, shuffle, seed
        # yield (index, seed of this sample's random augmentation) instead of the index: the seed follows the
        # sample's place in the epoch, so a resumed epoch draws what the run in one go drew (deepres.data.cifar)
        self.draw_seeds = draw_seeds
        self.rank, self.world = rank, world
        self.epoch = 0
        # The loader's own generator, reseeded from (seed, epoch, rank) at every epoch: the loader draws its
        # worker seeds from it, not from torch's global generator, so creating a loader's iterator (a resumed
        # epoch's, a validation's) leaves the training's random draws (deepres.training.rng_state) alone.
        self.loader_generator = torch.Generator()
        self.set_epoch(0)
        self.skip = 0  # samples of this rank to skip once, at the next __iter__ (mid-epoch resume)
        per_rank = length // world if drop_last else math.ceil(length / world)
        self.num_samples = per_rank
        self.drop_last = drop_last

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch
        self.loader_generator.manual_seed((self.seed * 1_000_003 + epoch) * 1_009 + self.rank)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.num_samples * self.world
        if total > len(order):  # pad by wrapping around so every rank runs the same number of steps
            order += order[: total - len(order)]
        mine = order[:total][self.rank :: self.world]
        skip, self.skip = self.skip, 0
        if self.draw_seeds:
            base = ((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank) << 32
            return iter([(i, base + place) for place, i in enumerate(mine)][skip:])
        return iter(mine[skip:])


class DeepresDataModule(L.LightningDataModule):
    """Base class: subclasses build `self.train_set` / `self.val_set` in `setup` and say
    `num_classes` (0 = a regression target) and `input_shape` (one sample, without the batch)."""

    num_classes: int
    input_shape: tuple[int, ...]

    def __init__(self, batch_size: int, num_workers: int = 0, seed: int = 0,
                 worker_start_method: str = "forkserver"):
        super().__init__()
        # Lightning warns on every mid-epoch resume that a loader without state_dict/load_state_dict is not
        # resumable; deepres's loaders resume exactly from the loop's own progress record (see
        # `_batches_already_done`, checked by the mid-epoch resume tests), so the warning does not apply.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        self.batch_size = batch_size
        self.num_workers = num_workers
        worker_context(worker_start_method)  # fail on a bad name now, not at the first batch
        self.worker_start_method = worker_start_method
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.batch_mix: BatchMix | None = None  # MixUp/CutMix of training batches, set by image modules

    def mix_batch(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MixUp/CutMix a training batch on the device (deepres.data.recipes); other stages pass through."""
        trainer = self.trainer
        if self.batch_mix is None or trainer is None or not trainer.training:
            return images, labels
        return self.batch_mix(images, labels)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        rank, world = rank_and_world(self.trainer)
        sampler = ResumableSampler(len(dataset), shuffle=train, seed=self.seed, rank=rank, world=world,
                                   drop_last=False, draw_seeds=train and getattr(dataset, "draws_per_sample", False))
        if train:
            batches_per_epoch = len(sampler) // self.batch_size
            done = self._batches_already_done()
            sampler.skip = done * self.batch_size if done < batches_per_epoch else 0
        return WorkerLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
            generator=sampler.loader_generator,
            drop_last=train, persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
            multiprocessing_context=worker_context(self.worker_start_method) if self.num_workers > 0 else None,
            worker_init_fn=ignore_stop_signals if self.num_workers > 0 else None,
        )

    def _batches_already_done(self) -> int:
        """Batches of the current epoch a restored checkpoint has already trained on (`processed`:
        a checkpoint written in on_train_batch_end has processed, not yet completed, its batch)."""
        trainer = getattr(self, "trainer", None)
        return 0 if trainer is None else batches_done_in_epoch(trainer)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
