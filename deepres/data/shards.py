"""Train and validate from webdataset shards, whoever wrote them, on any number of ranks.

    ShardDataModule(root="/data/imagenet-shards", batch_size=256, num_workers=8)     # OUT of deepres shard
    ShardDataModule(train_urls="pipe:aws s3 cp s3://b/train/train-{000000..001281}.tar -",
                    train_index="/data/imagenet-shards/train/index.json", ...)     # streamed shards
    ShardDataModule(train_index="/data/in1k/train.json", label_field="json:label", ...)  # a wids list

Shards written by another tool need a list of their sample counts: `deepres shard --index SHARDS`
writes one (see deepres.data.shard_format for the wids and timm lists that work as they are).

The failures webdataset users keep reporting (webdataset issues #188, #225, #250, #303) are made
impossible here by construction rather than by tuning:

- **A rank with no shards hangs DDP** (#188). Training readers never own a fixed subset of shards: reader
  slot s of S = world_size * num_workers reads positions s, s+S, s+2S, ... of an endless sequence of
  shuffled permutations of *all* shards, so every reader always has data, whatever the shard count.
  One pass over the permutations reads every shard once; readers only resample when there are fewer
  shards than readers or the epoch asks for more samples.
- **Ranks with different batch counts hang DDP at the epoch end** (#225, #250). The number of training
  steps per rank comes from the index (samples // (world_size * batch_size)) and is the same on every
  rank; each data-loader worker yields an exact share of it and `ShardLoader` checks the total.
- **`with_epoch` silently multiplies by the number of workers** (#303). There is no per-worker epoch
  length: the rank's step count is split across its workers, so the total is right for any num_workers.
- **Resampled streams never end.** Every pass yields exactly `len(loader)` batches and stops.
- **Validation must count every sample once.** The samples are cut into contiguous ranges, one per rank
  (sizes differ by at most one), and each rank's range into the same number of batches of at most
  `batch_size`; no sample is read twice or padded, so summing correct/total over ranks is exact.

Corrupt samples (undecodable image, missing image or label, truncated, unreadable or stalled shard) are
skipped and counted per reason (`skipped_samples`, summed over ranks into metrics.csv and finished.json by
deepres.training.skipped_samples), and rank 0 logs them; they never stop training. A `pipe:` shard whose
command gives no data for `shard_timeout_s` seconds is abandoned with one line, and the stream moves on. Batches leave the workers
as uint8 and are normalised after the transfer to the device (`on_after_batch_transfer`): a quarter of
the bytes through worker IPC and host-to-device copies, the same numbers as torchvision's ToTensor +
Normalize.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch

from deepres.data.base import (
    DeepresDataModule,
    WorkerLoader,
    ignore_stop_signals,
    rank_and_world,
    worker_context,
)
from deepres.data.recipes import AutoAugmentName, BatchMix
from deepres.data.recipes import auto_augment as auto_augment_policy
from deepres.data.shard_format import SampleFields
from deepres.data.shard_sets import ShardSet, no_list_message, resolve_shards
from deepres.data.shard_stream import ImageTransform, TrainShardStream, ValShardStream
from deepres.errors import ConfigError
from deepres.lightning_compat import gather_from_ranks

# the loader's parts, importable from here as from their own modules
__all__ = ["NORMALIZATION", "ImageTransform", "ShardDataModule", "ShardLoader", "ShardSet", "TrainShardStream",
           "ValShardStream", "resolve_shards"]

log = logging.getLogger(__name__)

STREAM_STATE_KEY = "train_streams"  # in the data module's checkpoint entry: one ShardLoader.stream_state per rank

# per-channel mean/std of the training images (torchvision's ImageNet numbers; CIFAR-10's)
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

Batch = tuple[torch.Tensor, torch.Tensor]  # images (B, 3, H, W) uint8 until normalised, labels (B,)


# ---------------------------------------------------------------- the loader Lightning iterates


class ShardLoader:
    """Exactly `len(self)` (images, labels) batches per pass, whatever the number of workers.

    Not a DataLoader on purpose: Lightning then neither injects a sampler nor warns about the length
    of an IterableDataset, and the length here is exact by construction. Workers are started per pass
    (not persistent) so that each pass's shard order sees the current epoch. `position_fn` gives
    (epoch, batches of it already trained) from the trainer; without it, passes are counted here.

    A training loader also keeps where each worker's stream stood after every batch of the pass
    (`stream_state`), which a checkpoint saves; `resume_from` hands such a state to the next pass, which
    then continues every stream exactly (deepres.data.shard_stream.TrainShardStream).
    """

    def __init__(self, stream: TrainShardStream | ValShardStream, num_batches: int, num_workers: int,
                 rank: int, position_fn: Callable[[], tuple[int, int] | None] | None = None,
                 worker_start_method: str = "forkserver") -> None:
        self.stream, self.num_batches, self.num_workers, self.rank = stream, num_batches, num_workers, rank
        self.worker_start_method = worker_start_method
        self.position_fn = position_fn
        self.passes = 0
        self.skipped: Counter[str] = Counter()  # skipped samples by reason (shard_stream.SKIP_REASONS)
        self.resume_from: dict[str, Any] | None = None  # a saved `stream_state` for the next pass
        self._start: list[int] = []  # each worker's stream position when this pass began
        self._exact = True  # False for a pass that reads a fresh order: its positions resume nothing
        self._after: dict[int, int] = {}  # batch number in the epoch -> its worker's position after it

    def __len__(self) -> int:
        return self.num_batches

    @property
    def _workers(self) -> int:
        return max(self.num_workers, 1)

    @property
    def corrupt_samples(self) -> int:
        return sum(self.skipped.values())

    def stream_state(self, done: int) -> dict[str, Any]:
        """Where each worker's stream stood once `done` batches of the current epoch were trained."""
        positions = list(self._start)
        for batch in sorted(b for b in self._after if b < done):  # the last batch of each worker before `done`
            positions[batch % self._workers] = self._after[batch]
        return {"epoch": self.stream.epoch, "done": done, "workers": self._workers,
                "world_size": getattr(self.stream, "world_size", 1), "positions": positions if self._exact else None}

    def _positions(self, epoch: int, skip: int) -> list[int] | None:
        """Each worker's stream position for a pass that starts `skip` batches into `epoch`; None when
        nothing says where the streams stood (the rest of the epoch then reads a fresh shard order)."""
        saved, self.resume_from = self.resume_from, None
        if skip == 0:
            return [0] * self._workers
        expected = {"epoch": epoch, "done": skip, "workers": self._workers,
                    "world_size": getattr(self.stream, "world_size", 1)}
        if saved is not None and len(saved.get("positions") or ()) == self._workers and all(
                saved.get(k) == v for k, v in expected.items()):
            return list(saved["positions"])
        if self.rank == 0:
            why = ("the checkpoint does not say where the shard streams stood"
                   if saved is None or saved.get("positions") is None else
                   "the checkpoint's streams were read by "
                   f"{saved.get('workers')} workers on each of {saved.get('world_size')} ranks, not "
                   f"{self._workers} on each of {expected['world_size']}")
            log.warning("resuming %d batches into epoch %d: %s, so the rest of this epoch reads a fresh shard "
                        "order (exact from the next epoch on)", skip, epoch, why)
        return None

    def _report(self, skipped: dict[str, int], messages: list[str]) -> None:
        self.skipped.update(skipped)
        count = sum(skipped.values())
        if self.rank == 0:
            for message in messages:
                log.warning("skipped corrupt sample %s", message)
            # a stalled shard's line already says that the rest of it is skipped
            stalled_lines = sum("shard_timeout_s" in message for message in messages)
            more = count - len(messages) - skipped.get("stalled_shard", 0) + stalled_lines
            if more > 0:
                log.warning("skipped %d more corrupt samples in this batch", more)

    def __iter__(self) -> Iterator[Batch]:
        # runs at the first next(), i.e. after Lightning has restored a checkpoint's loop state
        position = self.position_fn() if self.position_fn is not None else None
        self.stream.epoch, self.stream.skip = (self.passes, 0) if position is None else position
        self.passes += 1
        skip = self.stream.skip
        if isinstance(self.stream, TrainShardStream):
            self.stream.positions = self._positions(self.stream.epoch, skip)
            self._exact = self.stream.positions is not None
            self._start = list(self.stream.positions or [0] * self._workers)
            self._after = {}
        expected = self.num_batches - skip
        context = worker_context(self.worker_start_method) if self.num_workers > 0 else None
        # worker seeds from (seed, epoch, rank), not from torch's global generator: creating this loader draws
        # nothing the training's restored generators would miss (deepres.training.rng_state)
        seed = getattr(self.stream, "seed", 0)
        seeds = torch.Generator().manual_seed((seed * 1_000_003 + self.stream.epoch) * 1_009 + self.rank)
        loader = WorkerLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            multiprocessing_context=context, generator=seeds,
                            worker_init_fn=ignore_stop_signals if self.num_workers > 0 else None)
        seen = 0
        for images, labels, (skipped, messages, after) in loader:
            if skipped:
                self._report(skipped, messages)
            if after is not None:
                self._after[skip + seen] = after
            seen += 1
            yield images, labels
        if seen != expected:  # cannot happen by construction; if it did, DDP would hang
            raise RuntimeError(f"shard loader produced {seen} batches instead of {expected}")


# ---------------------------------------------------------------- the data module


class ShardDataModule(DeepresDataModule):
    """ImageNet-style classification from webdataset shards, local or streamed.

    The shards may come from `deepres shard` or from any other webdataset writer (webdataset's
    ShardWriter, img2dataset, the public ImageNet copies); the loader needs a list of the samples in
    each shard: the index.json of `deepres shard` or `deepres shard --index`, a wids shard list, or a
    timm `_info.json`.

    Args:
        root: the folder holding <split>/index.json (the OUT of `deepres shard`), or a timm _info.json.
        train_urls: shard URLs for training instead of those in the index: a path or brace pattern
            (`/data/train-{000000..001281}.tar`), `pipe:` commands for object stores; `::` joins lists.
        val_urls: the same for validation.
        train_index: the training shard list (path or URL): a deepres index.json, a wids shard list or a
            timm _info.json; default ROOT/train/index.json, ROOT/_info.json, or index.json beside local train_urls.
        val_index: the same for validation.
        label_field: the sample field holding the label: an extension (`cls`, `label`, `txt`) or
            `json:KEY` for a key of the .json sidecar; default: what the index recorded, else `cls`.
        image_fields: image extensions tried in order; default: what the index recorded, else
            jpg, jpeg, png, webp.
        num_classes: the number of classes, for shard lists that do not name them (wids, timm).
        auto_augment: per-image policy after crop and flip in training: none, randaugment
            (`randaugment_ops` ops of `randaugment_magnitude`) or trivialaugment (deepres.data.recipes).
        randaugment_ops: RandAugment's N (Cubuk et al. 2020, ImageNet: 2).
        randaugment_magnitude: RandAugment's M (ImageNet: 9).
        mixup_alpha: MixUp's Beta(α, α) on training batches, on the device (0 = off; Zhang et al. 2018
            ImageNet: 0.2).
        cutmix_alpha: CutMix's Beta(α, α) (0 = off; Yun et al. 2019: 1.0). With both on, each batch
            gets one of the two.
        batch_size: samples per batch on each rank (the global batch is batch_size * world size).
        num_workers: data-loader processes per rank.
        shuffle_buffer: samples held per worker for shuffling (the shards are already class-shuffled).
        image_size: side of the square crops fed to the model.
        eval_resize: shorter side that validation images are resized to before the centre crop.
        recipe: augmentation and normalisation: `imagenet` (random-resized crop) or `cifar` (pad and crop).
        steps_per_epoch: training steps per rank per epoch; default samples // (batch_size * world size).
        seed: seed of the shard order and shuffle buffer (the same on every rank).
        worker_start_method: how worker processes start: `forkserver` (default; safe in DDP ranks),
            `spawn`, or `fork` (fastest start, but can deadlock in a multi-threaded DDP rank).
        shard_timeout_s: a `pipe:` shard whose command gives no data for this many seconds is abandoned
            (its command stopped, its remaining samples skipped as `stalled_shard`, one line logged) and
            the stream moves on; null waits forever.
    """

    def __init__(
        self,
        root: str | None = None,
        train_urls: str | None = None,
        val_urls: str | None = None,
        train_index: str | None = None,
        val_index: str | None = None,
        batch_size: int = 256,
        num_workers: int = 8,
        shuffle_buffer: int = 1000,
        image_size: int = 224,
        eval_resize: int = 256,
        recipe: Literal["imagenet", "cifar"] = "imagenet",
        steps_per_epoch: int | None = None,
        seed: int = 0,
        worker_start_method: Literal["forkserver", "spawn", "fork"] = "forkserver",
        label_field: str | None = None,
        image_fields: list[str] | None = None,
        num_classes: int | None = None,
        auto_augment: AutoAugmentName = "none",
        randaugment_ops: int = 2,
        randaugment_magnitude: int = 9,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        shard_timeout_s: float | None = 120.0,
    ) -> None:
        super().__init__(batch_size, num_workers, seed, worker_start_method)
        if shard_timeout_s is not None and shard_timeout_s <= 0:
            raise ConfigError(f"data.shard_timeout_s={shard_timeout_s}: give a positive number of seconds (or null).")
        self.shard_timeout_s = shard_timeout_s
        for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                                 ("image_size", image_size, 1), ("shuffle_buffer", shuffle_buffer, 0)):
            if value < low:
                raise ConfigError(f"data.{name}={value}: must be at least {low}.")
        if recipe not in NORMALIZATION:
            raise ConfigError(f"data.recipe={recipe!r}: choose one of {', '.join(NORMALIZATION)}.")
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ConfigError(f"data.steps_per_epoch={steps_per_epoch}: must be at least 1 (or unset).")
        if root is None and train_urls is None and train_index is None:
            raise ConfigError("ShardDataModule needs data.root (the OUT of `deepres shard`), or "
                              "data.train_urls / data.train_index.")
        self.root = os.path.expanduser(root) if root else None
        self.train_urls, self.val_urls = train_urls, val_urls
        self.train_index, self.val_index = train_index, val_index
        self.shuffle_buffer, self.image_size, self.eval_resize = shuffle_buffer, image_size, eval_resize
        self.recipe, self.steps_per_epoch = recipe, steps_per_epoch
        if num_classes is not None and num_classes < 1:
            raise ConfigError(f"data.num_classes={num_classes}: must be at least 1 (or unset).")
        SampleFields.of(image_fields, label_field)  # refuses malformed fields now, not in a worker
        self.label_field, self.image_fields, self._num_classes = label_field, image_fields, num_classes
        self.auto_augment, self.randaugment = auto_augment, (randaugment_ops, randaugment_magnitude)
        auto_augment_policy(auto_augment, *self.randaugment)  # refuses a bad name now
        self.mix_alphas = (mixup_alpha, cutmix_alpha)
        BatchMix(2, mixup_alpha, cutmix_alpha)  # refuses bad alphas now; built with num_classes in setup
        self._steps = 0  # training steps per epoch on this rank, fixed in train_dataloader
        self._sets: dict[str, ShardSet | None] = {}
        self._loaders: list[ShardLoader] = []
        self._train_loader: ShardLoader | None = None
        self._saved_streams: list[dict[str, Any]] | None = None  # from a checkpoint, one entry per rank
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- what the CLI links into the model

    @property
    def num_classes(self) -> int:
        shards = self._shards("train") or self._shards("val")
        if shards is None:
            raise ConfigError(no_list_message("train", str(self.root)))
        return len(shards.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def corrupt_samples(self) -> int:
        """Corrupt samples skipped so far on this rank (rank 0 logs its own as they occur)."""
        return sum(loader.corrupt_samples for loader in self._loaders)

    @property
    def skipped_samples(self) -> dict[str, int]:
        """Samples skipped so far on this rank, training and validation, by reason (SKIP_REASONS)."""
        return dict(sum((loader.skipped for loader in self._loaders), Counter()))

    # -- shards and ranks

    def _shards(self, split: str) -> ShardSet | None:
        if split not in self._sets:
            urls, index = (self.train_urls, self.train_index) if split == "train" else (self.val_urls, self.val_index)
            self._sets[split] = resolve_shards(split, urls, index, self.root, self._num_classes)
        return self._sets[split]

    def _fields(self, shards: ShardSet) -> SampleFields:
        return SampleFields.of(self.image_fields, self.label_field, shards.fields)

    def _train_position(self) -> tuple[int, int] | None:
        """(epoch, batches of it already trained) from the trainer, restored on resume; None without one."""
        if self.trainer is None:
            return None
        epoch, done = self.trainer.current_epoch, self._batches_already_done()
        if done >= self._steps:  # the checkpoint was taken at the end of an epoch: the next one starts
            epoch, done = epoch + 1, 0
        return epoch, done

    def setup(self, stage: str | None = None) -> None:
        train, val = self._shards("train"), self._shards("val")
        if train is not None and any(self.mix_alphas):
            self.batch_mix = BatchMix(len(train.classes), *self.mix_alphas)
        if train is None and stage in (None, "fit"):
            raise ConfigError(no_list_message("train", str(self.root)))
        if train is not None and val is not None and val.classes != train.classes:
            raise ConfigError("the train and val shard lists name different classes; convert both splits "
                              "with one `deepres shard` run (or index them with the same --num-classes) so "
                              "that their labels agree.")

    # -- loaders

    def train_steps(self, world_size: int) -> int:
        shards = self._shards("train")
        assert shards is not None
        steps = self.steps_per_epoch or shards.num_samples // (self.batch_size * world_size)
        if steps < 1:
            raise ConfigError(
                f"{shards.num_samples} training samples do not fill one batch of {self.batch_size} on each "
                f"of {world_size} ranks. Lower data.batch_size or set data.steps_per_epoch."
            )
        return steps

    def train_dataloader(self) -> ShardLoader:
        shards = self._shards("train")
        if shards is None:
            raise ConfigError(no_list_message("train", str(self.root)))
        rank, world = rank_and_world(self.trainer)
        self._steps = self.train_steps(world)
        policy = auto_augment_policy(self.auto_augment, *self.randaugment)
        transform = ImageTransform(True, self.image_size, self.eval_resize, self.recipe, policy)
        stream = TrainShardStream(shards, self.batch_size, self._steps, rank, world, transform,
                                  self.shuffle_buffer, self.seed, self.image_size, self._fields(shards))
        stream.stall_timeout_s = self.shard_timeout_s
        return self._track(ShardLoader(stream, self._steps, self.num_workers, rank, self._train_position,
                                       self.worker_start_method))

    def val_dataloader(self) -> ShardLoader | list:
        shards = self._shards("val")
        if shards is None or shards.num_samples == 0:
            return []  # Lightning skips validation
        rank, world = rank_and_world(self.trainer)
        transform = ImageTransform(False, self.image_size, self.eval_resize, self.recipe)
        stream = ValShardStream(shards, self.batch_size, rank, world, transform, self.image_size,
                                self._fields(shards))
        stream.stall_timeout_s = self.shard_timeout_s
        return self._track(ShardLoader(stream, stream.num_batches, self.num_workers, rank,
                                       worker_start_method=self.worker_start_method))

    def test_dataloader(self) -> ShardLoader | list:
        # ImageNet's test labels are not public; results are reported on val.
        return self.val_dataloader()

    def _track(self, loader: ShardLoader) -> ShardLoader:
        self._loaders.append(loader)
        if isinstance(loader.stream, TrainShardStream):
            self._train_loader = loader
            loader.resume_from = self._resume_state()
        return loader

    # -- where the training streams stood, in every checkpoint

    def state_dict(self) -> dict[str, Any]:
        """Every rank's training-stream positions (a collective: Lightning asks every rank while writing a
        checkpoint), so that a resume inside an epoch reads exactly the batches the run would have read."""
        trainer, loader = self.trainer, self._train_loader
        if trainer is None or loader is None:  # (a checkpoint written after validation inside an epoch too)
            return {}
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        return {STREAM_STATE_KEY: gather_from_ranks(trainer, loader.stream_state(done))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_streams = state_dict.get(STREAM_STATE_KEY)
        if self._train_loader is not None:
            self._train_loader.resume_from = self._resume_state()

    def _resume_state(self) -> dict[str, Any] | None:
        """This rank's saved stream state, once (a later pass starts where the trainer says)."""
        saved, self._saved_streams = self._saved_streams, None
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return saved[rank] if isinstance(saved, list) and rank < len(saved) else None

    # -- normalisation on the device

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> contiguous float, as ToTensor + Normalize give (run after the device copy)."""
        if images.device not in self._norm:
            # in 0..255 units, so one subtract and one divide replace ToTensor's /255 and Normalize
            self._norm[images.device] = tuple(  # type: ignore[assignment]
                torch.tensor(v, device=images.device).mul_(255).view(1, 3, 1, 1)
                for v in NORMALIZATION[self.recipe]
            )
        mean, std = self._norm[images.device]
        # one pass from the channels-last uint8 batch into a contiguous float one, then in place
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        return out.copy_(images).sub_(mean).div_(std)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, labels = batch
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        return self.mix_batch(images, labels)  # MixUp/CutMix in training, after normalisation
