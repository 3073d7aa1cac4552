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

Corrupt samples (undecodable image, missing label, truncated or unreadable shard) are skipped and
counted (`corrupt_samples`), and rank 0 logs them; they never stop training. Batches leave the workers
as uint8 and are normalised after the transfer to the device (`on_after_batch_transfer`): a quarter of
the bytes through worker IPC and host-to-device copies, the same numbers as torchvision's ToTensor +
Normalize.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate
from torchvision.transforms.v2 import functional as F

from deepres.data.base import DeepresDataModule, rank_and_world, worker_context
from deepres.data.recipes import AutoAugmentName, BatchMix
from deepres.data.recipes import auto_augment as auto_augment_policy
from deepres.data.shard_format import (
    INDEX_NAME,
    TIMM_INFO_NAME,
    SampleFields,
    ShardList,
    decode_rgb,
    describe_error,
    is_local,
    read_shard,
    read_shard_list,
)
from deepres.errors import ConfigError

log = logging.getLogger(__name__)

# per-channel mean/std of the training images (torchvision's ImageNet numbers; CIFAR-10's)
NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
RRC_MIN_SCALE = 0.08  # RandomResizedCrop's default smallest crop area (Szegedy et al. 2015)
MAX_LOGGED_PROBLEMS = 5  # corrupt samples described per batch; the rest are only counted

Batch = tuple[torch.Tensor, torch.Tensor]
# (images uint8 (B, 3, H, W), labels (B,), (number of skipped samples, a few of their descriptions))
WorkerBatch = tuple[torch.Tensor, torch.Tensor, tuple[int, list[str]]]


# ---------------------------------------------------------------- which shards


@dataclass(frozen=True)
class ShardSet:
    """Shard URLs in list order, the number of samples in each, the class names, the recorded fields."""

    urls: tuple[str, ...]
    samples: tuple[int, ...]
    classes: tuple[str, ...]
    fields: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_samples(self) -> int:
        return sum(self.samples)

    def nonempty(self) -> ShardSet:
        keep = [i for i, n in enumerate(self.samples) if n > 0]
        return ShardSet(tuple(self.urls[i] for i in keep), tuple(self.samples[i] for i in keep), self.classes,
                        self.fields)


def _shard_name_in(url: str, names: set[str]) -> str | None:
    # A URL names its shard somewhere in it: a path, s3://b/train-000001.tar, `pipe:aws s3 cp ... -`.
    candidates = [os.path.basename(t) for t in re.findall(r"[\w./-]+\.tar", url)]
    return next((c for c in reversed(candidates) if c in names), None)


def _default_list(split: str, root: str) -> str | None:
    """ROOT/<split>/index.json (deepres), else ROOT/_info.json (timm) when it describes the split."""
    index = os.path.join(root, split, INDEX_NAME)
    if os.path.exists(index):
        return index
    info = os.path.join(root, TIMM_INFO_NAME)
    if os.path.exists(info):
        with contextlib.suppress(ConfigError):
            read_shard_list(info, split)
            return info
    return None


def _no_list_message(split: str, root: str) -> str:
    tars = [os.path.join(d, n) for d in (root, os.path.join(root, split)) if os.path.isdir(d)
            for n in sorted(os.listdir(d)) if n.endswith(".tar")]
    found = f" {root} holds {len(tars)} .tar shards but no index for them." if tars else ""
    return (f"no {split} shards found: neither {os.path.join(root, split, INDEX_NAME)} nor a timm "
            f"{os.path.join(root, TIMM_INFO_NAME)} with a {split!r} split exists.{found} Index existing webdataset "
            f"shards with `deepres shard --index {os.path.join(root, split)}` (or pass data.{split}_index with a "
            "wids shard list), or convert images with `deepres shard SRC OUT`.")


def _classes(listed: ShardList, num_classes: int | None, split: str) -> tuple[str, ...]:
    if listed.classes is None:
        if num_classes is None:
            raise ConfigError(f"{listed.location} (a {listed.kind} shard list) does not name the classes: set "
                              "data.num_classes, or index the shards with `deepres shard --index`, which counts them.")
        return tuple(str(i) for i in range(num_classes))
    if num_classes is not None and num_classes != len(listed.classes):
        raise ConfigError(f"data.num_classes={num_classes}, but the {split} shard list {listed.location} names "
                          f"{len(listed.classes)} classes. Leave data.num_classes unset or fix the list.")
    return listed.classes


def resolve_shards(split: str, urls: str | None, index: str | None, root: str | None,
                   num_classes: int | None = None) -> ShardSet | None:
    """The shards of one split from a URL pattern and/or a shard list; None if the split is not configured.

    The list (a deepres index.json, a wids shard list or a timm _info.json) defaults to
    ROOT/<split>/index.json or ROOT/_info.json, or to the index.json beside local shard files; the URLs
    default to the shards the list names, resolved against the list's location.
    """
    from webdataset.shardlists import expand_urls

    expanded = expand_urls(urls) if urls else []
    if index is None and root is not None:
        index = _default_list(split, root)
        if index is None:
            if urls is None:
                return None
            raise ConfigError(_no_list_message(split, root))
    if index is None and expanded and is_local(expanded[0]):
        index = os.path.join(os.path.dirname(expanded[0]), INDEX_NAME)
        if not os.path.exists(index):
            raise ConfigError(f"{split}_urls {urls!r} have no {INDEX_NAME} beside them. Index the shards with "
                              f"`deepres shard --index '{urls}'`, or pass {split}_index with their shard list.")
    if index is None:
        if urls is None:
            return None
        raise ConfigError(
            f"{split}_urls {urls!r} are not local files, so the index cannot be found beside them. Pass "
            f"{split}_index with the {INDEX_NAME} that `deepres shard` wrote (a path or a pipe: URL), a wids "
            f"shard list or a timm {TIMM_INFO_NAME}."
        )
    listed = read_shard_list(index, split)
    classes = _classes(listed, num_classes, split)
    if not expanded:
        if index.startswith("pipe:"):  # the shards' own URLs cannot be derived from a command
            raise ConfigError(f"{split}_index {index!r} is remote: pass {split}_urls naming its shards as well.")
        return ShardSet(tuple(e.url for e in listed.entries), tuple(e.samples for e in listed.entries), classes,
                        listed.fields)
    by_name = {e.name: e.samples for e in listed.entries}
    samples = []
    for url in expanded:
        name = _shard_name_in(url, set(by_name))
        if name is None:
            raise ConfigError(
                f"{split} shard URL {url!r} names no shard listed in {index}. Use the shard names "
                "the list holds (e.g. train-000000.tar) or point the index option at their list."
            )
        samples.append(by_name[name])
    missing = [u for u in expanded if is_local(u) and not os.path.exists(u)]
    if missing:
        raise ConfigError(f"{len(missing)} {split} shard files do not exist, e.g. {missing[0]}.")
    return ShardSet(tuple(expanded), tuple(samples), classes, listed.fields)


# ---------------------------------------------------------------- decoding one sample


def random_resized_crop_box(width: int, height: int, rng: random.Random | Any = random) -> tuple[int, int, int, int]:
    """(top, left, height, width) drawn exactly as torchvision's RandomResizedCrop.get_params draws it
    (area 8-100 %, aspect 3/4-4/3 log-uniform, ten tries, then a centre crop), with Python's RNG: its
    per-call torch ops cost ~0.4 ms per image, a fifth of decoding a typical JPEG."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(RRC_MIN_SCALE, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * (4 / 3)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ImageTransform:
    """Image bytes -> uint8 (S, S, 3) tensor: torchvision's standard augmentation for the recipe.

    imagenet train: RandomResizedCrop(S) (bilinear, antialiased) + horizontal flip; eval:
    Resize(eval_resize) + CenterCrop(S). cifar train: 4-pixel zero pad + random crop + flip; eval:
    CenterCrop(S). Random numbers come from Python's `random`, which DataLoader seeds per worker.
    Pixels stay in decoding order (HWC): stacking contiguous HWC images is ~5x cheaper than stacking
    the permuted CHW views that ToTensor/PILToTensor return.
    """

    def __init__(self, train: bool, image_size: int, eval_resize: int, recipe: str,
                 policy: Callable | None = None) -> None:
        self.train, self.size, self.eval_resize, self.recipe = train, image_size, eval_resize, recipe
        self.policy = policy if train else None  # RandAugment / TrivialAugmentWide (deepres.data.recipes)
        self.min_side: int | None = None
        if recipe == "imagenet":
            # Decode JPEGs at reduced scale only while even the smallest crop keeps >= image_size pixels.
            self.min_side = math.ceil(image_size / math.sqrt(RRC_MIN_SCALE)) if train else eval_resize

    def _augment(self, img: Image.Image) -> Image.Image:
        s = self.size
        if self.recipe == "imagenet" and self.train:
            top, left, h, w = random_resized_crop_box(*img.size)
            img = F.resized_crop(img, top, left, h, w, [s, s], antialias=True)
        elif self.recipe == "imagenet":
            return F.center_crop(F.resize(img, [self.eval_resize], antialias=True), [s, s])
        elif self.train:
            img = F.pad(img, [4])
            img = F.crop(img, random.randint(0, img.height - s), random.randint(0, img.width - s), s, s)
        else:
            return F.center_crop(img, [s, s])
        img = F.horizontal_flip(img) if random.random() < 0.5 else img
        return img if self.policy is None else self.policy(img)

    def __call__(self, data: bytes) -> torch.Tensor:
        # np.array copies, as torchvision's pil_to_tensor does: PIL's buffer is read-only
        return torch.from_numpy(np.array(self._augment(decode_rgb(data, self.min_side))))


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _share(total: int, parts: int, part: int) -> int:
    """Part `part` of `total` split into `parts` near-equal integers that sum to `total`."""
    return total // parts + (part < total % parts)


def _shard_items(url: str, count: int, reader: str = "deepres") -> Iterator[dict[str, Any] | str]:
    """Exactly `count` items for a shard the index says holds `count` samples.

    Each is a sample in tar order, or a string saying why the sample at that position is missing (the
    shard ended early or could not be read). Extra samples beyond the index are ignored: the counts in
    the index are what keeps ranks in step.
    """
    n, reason = 0, "shard ended early"
    try:
        for sample in read_shard(url, reader):
            if n == count:
                break
            yield sample
            n += 1
    except Exception as exc:  # missing file, truncated tar, failing pipe command: skip the rest
        reason = describe_error(exc)
    for i in range(n, count):
        yield f"{url} sample {i}: {reason}"


class _Decoder:
    """Turns shard items into (image, label), or a description of why the sample was skipped."""

    def __init__(self, transform: ImageTransform, classes: tuple[str, ...], fields: SampleFields) -> None:
        self.transform, self.num_classes, self.fields = transform, len(classes), fields
        self.class_index = {c: i for i, c in enumerate(classes)}

    def __call__(self, item: dict[str, Any] | str) -> tuple[torch.Tensor, int] | str:
        if isinstance(item, str):
            return item
        try:
            label = self.fields.label_index(item, self.num_classes, self.class_index)
            return self.transform(self.fields.image_bytes(item)), label
        except Exception as exc:  # any decoder error: skip the sample, never stop training
            return f"{item.get('__key__')} in {item.get('__url__')}: {describe_error(exc)}"


def _collate(good: list[tuple[torch.Tensor, int]], skipped: int, problems: list[str],
             shape: tuple[int, ...]) -> WorkerBatch:
    """(B, 3, H, W) uint8 as a view of (B, H, W, 3) memory (channels-last), labels, skipped samples."""
    if good:  # default_collate stacks straight into shared memory inside a worker: one copy fewer
        images = default_collate([img for img, _ in good]).permute(0, 3, 1, 2)
    else:  # every sample of this batch was corrupt
        images = torch.empty((0, *shape), dtype=torch.uint8)
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, (skipped, problems[:MAX_LOGGED_PROBLEMS])


# ---------------------------------------------------------------- training: fixed steps per rank


def shard_order(num_shards: int, slot: int, slots: int, seed: int | str, epoch: int) -> Iterator[int]:
    """Shard indices for reader `slot` of `slots`: positions slot, slot+slots, ... of an endless
    sequence of permutations of all shards, seeded by (seed, epoch) and so the same on every rank."""
    position, rounds = slot, 0
    while True:
        perm = list(range(num_shards))
        random.Random(f"{seed}:{epoch}:{rounds}").shuffle(perm)
        while position < num_shards:
            yield perm[position]
            position += slots
        position, rounds = position - num_shards, rounds + 1


class TrainShardStream(IterableDataset):
    """Yields exactly `steps` full batches per pass on this rank, split exactly across its workers."""

    def __init__(self, shards: ShardSet, batch_size: int, steps: int, rank: int, world_size: int,
                 transform: ImageTransform, shuffle_buffer: int, seed: int, image_size: int,
                 fields: SampleFields | None = None) -> None:
        super().__init__()
        self.shards = shards.nonempty()
        if not self.shards.urls:
            raise ConfigError("the training shards hold no samples; check them with `deepres shard --verify`.")
        self.batch_size, self.steps, self.rank, self.world_size = batch_size, steps, rank, world_size
        self.decode = _Decoder(transform, shards.classes, fields or SampleFields.of(None, None, shards.fields))
        self.tar_reader = "deepres"  # shard_format.TAR_READERS; scripts/bench_shards.py compares them
        self.shuffle_buffer, self.seed, self.shape = shuffle_buffer, seed, (3, image_size, image_size)
        # set by ShardLoader before the workers start: the epoch, and the batches of it that a resumed
        # checkpoint already trained on (the rest of that epoch reads a fresh shard order)
        self.epoch, self.skip = 0, 0

    def _items(self, slot: int, slots: int) -> Iterator[dict[str, Any] | str]:
        # Wrong URLs or credentials make every shard unreadable: stop after twice the shard list (plus
        # a margin that makes a false alarm vanishingly unlikely when only some shards are broken).
        unreadable, give_up = 0, 2 * len(self.shards.urls) + 20
        for i in shard_order(len(self.shards.urls), slot, slots, f"{self.seed}:{self.skip}", self.epoch):
            readable = False
            with contextlib.closing(_shard_items(self.shards.urls[i], self.shards.samples[i], self.tar_reader)) as items:
                for item in items:
                    readable = readable or not isinstance(item, str)
                    yield item
            unreadable = 0 if readable else unreadable + 1
            if unreadable > give_up:
                raise ConfigError(f"{unreadable} shards in a row could not be read (last: {item}). Check "
                                  "the shard URLs, and the object-store client and credentials of pipe: URLs.")

    def __iter__(self) -> Iterator[WorkerBatch]:
        from webdataset.filters import shuffle

        worker, workers = _worker()
        quota = _share(self.steps - self.skip, workers, worker)
        slot, slots = self.rank * workers + worker, self.world_size * workers
        rng = random.Random(f"{self.seed}:{self.skip}:{self.epoch}:{slot}")
        items = self._items(slot, slots)
        if self.shuffle_buffer > 1:
            items = shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(items)
        # An endless stream of nothing but corrupt samples would never fill a batch: give up after
        # twenty datasets' worth of failures in a row (a healthy stream essentially never gets there).
        give_up = 20 * self.shards.num_samples
        good: list[tuple[torch.Tensor, int]] = []
        problems: list[str] = []  # the first few descriptions; all are counted in `skipped`
        skipped = failures = 0
        while quota > 0:
            out = self.decode(next(items))
            if isinstance(out, str):
                skipped, failures = skipped + 1, failures + 1
                if len(problems) < MAX_LOGGED_PROBLEMS:
                    problems.append(out)
                if failures > give_up:
                    raise ConfigError(f"no decodable sample in {give_up} tries (last: {out}). "
                                      "Check the shards with `deepres shard --verify`.")
                continue
            failures = 0
            good.append(out)
            if len(good) == self.batch_size:
                yield _collate(good, skipped, problems, self.shape)
                good, problems, skipped, quota = [], [], 0, quota - 1


# ---------------------------------------------------------------- validation: every sample once


class ValShardStream(IterableDataset):
    """This rank's contiguous range of the samples, in `num_batches` batches (equal on every rank)."""

    def __init__(self, shards: ShardSet, batch_size: int, rank: int, world_size: int,
                 transform: ImageTransform, image_size: int, fields: SampleFields | None = None) -> None:
        super().__init__()
        self.shards, self.rank, self.world_size = shards, rank, world_size
        self.decode = _Decoder(transform, shards.classes, fields or SampleFields.of(None, None, shards.fields))
        self.tar_reader = "deepres"
        self.shape = (3, image_size, image_size)
        per_rank = -(-shards.num_samples // world_size)
        self.num_batches = -(-per_rank // batch_size)
        self.epoch, self.skip = 0, 0  # validation reads the same samples every time

    def _range(self, start: int, stop: int) -> Iterator[dict[str, Any] | str]:
        """Exactly stop - start items: global samples [start, stop) in index order."""
        offset = 0
        for url, count in zip(self.shards.urls, self.shards.samples, strict=True):
            lo, hi = max(start - offset, 0), min(stop - offset, count)
            if lo < hi:
                with contextlib.closing(_shard_items(url, count, self.tar_reader)) as items:
                    yield from itertools.islice(items, lo, hi)
            offset += count

    def __iter__(self) -> Iterator[WorkerBatch]:
        worker, workers = _worker()
        n, k = self.shards.num_samples, self.num_batches
        rank_start = n * self.rank // self.world_size
        rank_size = n * (self.rank + 1) // self.world_size - rank_start
        sizes = [_share(rank_size, k, b) for b in range(k)]
        # each worker takes a contiguous block of batches, so it reads few shards besides its own
        first, last = k * worker // workers, k * (worker + 1) // workers
        start = rank_start + sum(sizes[:first])
        items = self._range(start, start + sum(sizes[first:last]))
        for b in range(first, last):
            decoded = [self.decode(item) for item in itertools.islice(items, sizes[b])]
            good = [d for d in decoded if not isinstance(d, str)]
            problems = [d for d in decoded if isinstance(d, str)]
            yield _collate(good, len(problems), problems, self.shape)


# ---------------------------------------------------------------- the loader Lightning iterates


class ShardLoader:
    """Exactly `len(self)` (images, labels) batches per pass, whatever the number of workers.

    Not a DataLoader on purpose: Lightning then neither injects a sampler nor warns about the length
    of an IterableDataset, and the length here is exact by construction. Workers are started per pass
    (not persistent) so that each pass's shard order sees the current epoch. `position_fn` gives
    (epoch, batches of it already trained) from the trainer; without it, passes are counted here.
    """

    def __init__(self, stream: TrainShardStream | ValShardStream, num_batches: int, num_workers: int,
                 rank: int, position_fn: Callable[[], tuple[int, int] | None] | None = None,
                 worker_start_method: str = "forkserver") -> None:
        self.stream, self.num_batches, self.num_workers, self.rank = stream, num_batches, num_workers, rank
        self.worker_start_method = worker_start_method
        self.position_fn = position_fn
        self.passes = 0
        self.corrupt_samples = 0

    def __len__(self) -> int:
        return self.num_batches

    def _report(self, count: int, messages: list[str]) -> None:
        self.corrupt_samples += count
        if self.rank == 0:
            for message in messages:
                log.warning("skipped corrupt sample %s", message)
            if count > len(messages):
                log.warning("skipped %d more corrupt samples in this batch", count - len(messages))

    def __iter__(self) -> Iterator[Batch]:
        # runs at the first next(), i.e. after Lightning has restored a checkpoint's loop state
        position = self.position_fn() if self.position_fn is not None else None
        self.stream.epoch, self.stream.skip = (self.passes, 0) if position is None else position
        self.passes += 1
        expected = self.num_batches - self.stream.skip
        context = worker_context(self.worker_start_method) if self.num_workers > 0 else None
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available(), persistent_workers=False,
                            multiprocessing_context=context)
        seen = 0
        for images, labels, (count, messages) in loader:
            if count:
                self._report(count, messages)
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
    ) -> None:
        super().__init__(batch_size, num_workers, seed, worker_start_method)
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
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- what the CLI links into the model

    @property
    def num_classes(self) -> int:
        shards = self._shards("train") or self._shards("val")
        if shards is None:
            raise ConfigError(_no_list_message("train", str(self.root)))
        return len(shards.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def corrupt_samples(self) -> int:
        """Corrupt samples skipped so far on this rank (rank 0 logs its own as they occur)."""
        return sum(loader.corrupt_samples for loader in self._loaders)

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
            raise ConfigError(_no_list_message("train", str(self.root)))
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
            raise ConfigError(_no_list_message("train", str(self.root)))
        rank, world = rank_and_world(self.trainer)
        self._steps = self.train_steps(world)
        policy = auto_augment_policy(self.auto_augment, *self.randaugment)
        transform = ImageTransform(True, self.image_size, self.eval_resize, self.recipe, policy)
        stream = TrainShardStream(shards, self.batch_size, self._steps, rank, world, transform,
                                  self.shuffle_buffer, self.seed, self.image_size, self._fields(shards))
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
        return self._track(ShardLoader(stream, stream.num_batches, self.num_workers, rank,
                                       worker_start_method=self.worker_start_method))

    def test_dataloader(self) -> ShardLoader | list:
        # ImageNet's test labels are not public; results are reported on val.
        return self.val_dataloader()

    def _track(self, loader: ShardLoader) -> ShardLoader:
        self._loaders.append(loader)
        return loader

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
