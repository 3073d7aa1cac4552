"""The streaming side of the shard loader: decoding and augmenting one sample, and the per-worker
streams that give every rank the same number of batches (deepres.data.shards says why each rule is there).

    TrainShardStream   exactly `steps` full batches per pass on a rank, split across its workers, read
                       from endless shuffled permutations of all shards (`shard_order`)
    ValShardStream     the rank's contiguous range of the samples, every sample once
    ImageTransform     image bytes -> uint8 HWC tensor: torchvision's augmentation for the recipe

Workers send uint8 batches plus (skipped samples by reason, a few of their descriptions); `ShardLoader` in
deepres.data.shards counts and logs the skipped ones.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, default_collate
from torchvision.transforms.v2 import functional as F

from deepres.data.recipes import apply_seeded
from deepres.data.shard_format import SampleFields, ShardStalled, decode_rgb, describe_error, read_shard
from deepres.data.shard_sets import ShardSet
from deepres.errors import ConfigError

RRC_MIN_SCALE = 0.08  # RandomResizedCrop's default smallest crop area (Szegedy et al. 2015)
MAX_LOGGED_PROBLEMS = 5  # corrupt samples described per batch; the rest are only counted

# Why a sample was skipped: the keys of the counts in metrics.csv (data/skipped/<reason>) and finished.json.
SKIP_REASONS = ("undecodable_image", "no_image", "bad_label", "truncated_shard", "unreadable_shard", "stalled_shard")

# (images uint8 (B, 3, H, W), labels (B,), ({reason: skipped samples}, a few of their descriptions, the
# worker's stream position after this batch (training; None in validation)))
WorkerBatch = tuple[torch.Tensor, torch.Tensor, tuple[dict[str, int], list[str], int | None]]


class Skip(str):
    """A skipped sample's description (empty: counted, not described), with its reason (SKIP_REASONS)."""

    reason: str

    @classmethod
    def of(cls, reason: str, text: str) -> Skip:
        skip = cls(text)
        skip.reason = reason
        return skip


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
    CenterCrop(S). Training streams give each sample a seed of its own (its place in the stream), so the
    draws do not depend on which worker decodes it or on what that worker decoded before.
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

    def _augment(self, img: Image.Image, rng: random.Random | Any) -> Image.Image:
        s = self.size
        if self.recipe == "imagenet" and self.train:
            top, left, h, w = random_resized_crop_box(*img.size, rng)
            img = F.resized_crop(img, top, left, h, w, [s, s], antialias=True)
        elif self.recipe == "imagenet":
            return F.center_crop(F.resize(img, [self.eval_resize], antialias=True), [s, s])
        elif self.train:
            img = F.pad(img, [4])
            img = F.crop(img, rng.randint(0, img.height - s), rng.randint(0, img.width - s), s, s)
        else:
            return F.center_crop(img, [s, s])
        img = F.horizontal_flip(img) if rng.random() < 0.5 else img
        if self.policy is None:
            return img
        return apply_seeded(self.policy, img, rng.getrandbits(63))

    def __call__(self, data: bytes, seed: int | None = None) -> torch.Tensor:
        """`seed`: this sample's own augmentation draws (a resumed stream draws what the uninterrupted
        one drew, whatever came before); None draws from Python's global `random`."""
        rng = random if seed is None else random.Random(seed)
        # np.array copies, as torchvision's pil_to_tensor does: PIL's buffer is read-only
        return torch.from_numpy(np.array(self._augment(decode_rgb(data, self.min_side), rng)))


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _share(total: int, parts: int, part: int) -> int:
    """Part `part` of `total` split into `parts` near-equal integers that sum to `total`."""
    return total // parts + (part < total % parts)


def _shard_items(url: str, count: int, reader: str = "deepres",
                 stall_timeout_s: float | None = None) -> Iterator[dict[str, Any] | Skip]:
    """Exactly `count` items for a shard the index says holds `count` samples.

    Each is a sample in tar order, or a Skip saying why the sample at that position is missing (the
    shard ended early, could not be read, or stalled: then one line for the rest of the shard). Extra
    samples beyond the index are ignored: the counts in the index are what keeps ranks in step.
    """
    n, kind, reason = 0, "truncated_shard", "shard ended early"
    try:
        for sample in read_shard(url, reader, stall_timeout_s):
            if n == count:
                break
            yield sample
            n += 1
    except ShardStalled as exc:
        if n < count:
            yield Skip.of("stalled_shard", f"{url}: {exc} after {n} of its {count} samples; the rest are skipped")
            yield from (Skip.of("stalled_shard", "") for _ in range(n + 1, count))
        return
    except Exception as exc:  # missing file, truncated tar, failing pipe command: skip the rest
        kind, reason = "unreadable_shard", describe_error(exc)
    for i in range(n, count):
        yield Skip.of(kind, f"{url} sample {i}: {reason}")


class _Decoder:
    """Turns shard items into (image, label), or a description of why the sample was skipped."""

    def __init__(self, transform: ImageTransform, classes: tuple[str, ...], fields: SampleFields) -> None:
        self.transform, self.num_classes, self.fields = transform, len(classes), fields
        self.class_index = {c: i for i, c in enumerate(classes)}

    def __call__(self, item: dict[str, Any] | Skip, seed: int | None = None) -> tuple[torch.Tensor, int] | Skip:
        if isinstance(item, str):
            return item
        reason = "bad_label"
        try:  # any error: skip the sample, never stop training
            label = self.fields.label_index(item, self.num_classes, self.class_index)
            reason = "no_image"
            data = self.fields.image_bytes(item)
            reason = "undecodable_image"
            return self.transform(data, seed), label
        except Exception as exc:
            return Skip.of(reason, f"{item.get('__key__')} in {item.get('__url__')}: {describe_error(exc)}")


def _collate(good: list[tuple[torch.Tensor, int]], skipped: dict[str, int], problems: list[str],
             shape: tuple[int, ...], position: int | None = None) -> WorkerBatch:
    """(B, 3, H, W) uint8 as a view of (B, H, W, 3) memory (channels-last), labels, skipped samples."""
    if good:  # default_collate stacks straight into shared memory inside a worker: one copy fewer
        images = default_collate([img for img, _ in good]).permute(0, 3, 1, 2)
    else:  # every sample of this batch was corrupt
        images = torch.empty((0, *shape), dtype=torch.uint8)
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, (skipped, [str(p) for p in problems[:MAX_LOGGED_PROBLEMS]], position)


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


class ShuffleBuffer:
    """webdataset's shuffle buffer (`webdataset.filters.shuffle`, the same draws for the same generator):
    it holds up to `size` items, starts giving once it holds `initial`, and gives a uniformly drawn one,
    whose place the last item takes. Unlike a closure, its state is in the open: the items it holds, its
    generator and how many source items it has taken. Run over item numbers instead of items, it replays
    where a stream stood after any number of outputs without reading a byte (`TrainShardStream`)."""

    def __init__(self, size: int, initial: int, rng: random.Random) -> None:
        self.size, self.initial, self.rng = size, min(initial, size), rng
        self.items: list[Any] = []
        self.taken = 0  # source items taken so far

    def _pick(self) -> Any:
        items = self.items
        k = self.rng.randint(0, len(items) - 1)
        item, items[k] = items[k], items[-1]
        items.pop()
        return item

    def __call__(self, source: Iterator[Any]) -> Iterator[Any]:
        for item in source:
            self.items.append(item)
            self.taken += 1
            if len(self.items) < self.size:
                try:
                    self.items.append(next(source))
                    self.taken += 1
                except StopIteration:
                    pass
            if len(self.items) >= self.initial:
                yield self._pick()
        while self.items:
            yield self._pick()


class TrainShardStream(IterableDataset):
    """Yields exactly `steps` full batches per pass on this rank, split exactly across its workers.

    Each worker's stream is a pure function of (seed, epoch, rank, worker): the shards in `shard_order`,
    their items through a `ShuffleBuffer`, and each sample augmented with a seed of its own (its number in
    the stream). A worker reports with every batch how many items it has taken from its shuffled stream
    (its position); given those positions, a resumed pass continues each stream exactly where it stood:
    the shuffle is replayed over item numbers, only the items still in the buffer and the rest of the
    current shard are read again, and nothing is decoded twice.
    """

    def __init__(self, shards: ShardSet, batch_size: int, steps: int, rank: int, world_size: int,
                 transform: ImageTransform, shuffle_buffer: int, seed: int, image_size: int,
                 fields: SampleFields | None = None) -> None:
        super().__init__()
        self.shards = shards.nonempty()
        if not self.shards.urls:
            raise ConfigError("the training shards hold no samples; check them with `deepres shard --verify`.")
        self.batch_size, self.steps, self.rank, self.world_size = batch_size, steps, rank, world_size
        self.decode = _Decoder(transform, shards.classes, fields or SampleFields.of(None, None, shards.fields))
        self.tar_reader = "deepres"  # shard_format.TAR_READERS; scripts/benchmarks/bench_shards.py compares them
        self.shuffle_buffer, self.seed, self.shape = shuffle_buffer, seed, (3, image_size, image_size)
        # set by ShardLoader before the workers start: the epoch, the batches of it already trained (by a
        # resumed checkpoint), and where each worker's stream stood after them. Without positions, the rest
        # of a resumed epoch reads a fresh shard order (a checkpoint from another worker count or world size).
        self.epoch, self.skip = 0, 0
        self.positions: list[int] | None = None
        self.stall_timeout_s: float | None = None  # of a `pipe:` shard read (ShardDataModule sets it)

    def _shards(self, slot: int, slots: int, key: str) -> Iterator[tuple[int, int]]:
        """(shard index, number of its first item in this slot's stream), in the slot's shard order."""
        offset = 0
        for i in shard_order(len(self.shards.urls), slot, slots, key, self.epoch):
            yield i, offset
            offset += self.shards.samples[i]

    def _items(self, slot: int, slots: int, key: str, start: int = 0) -> Iterator[dict[str, Any] | Skip]:
        """The slot's items from item number `start` on: earlier shards are not opened, the shard holding
        `start` is read from its beginning (not decoded)."""
        # Wrong URLs or credentials make every shard unreadable: stop after twice the shard list (plus
        # a margin that makes a false alarm vanishingly unlikely when only some shards are broken).
        unreadable, give_up = 0, 2 * len(self.shards.urls) + 20
        for i, offset in self._shards(slot, slots, key):
            if offset + self.shards.samples[i] <= start:
                continue
            readable = False
            with contextlib.closing(_shard_items(self.shards.urls[i], self.shards.samples[i], self.tar_reader,
                                                 self.stall_timeout_s)) as items:
                for item in itertools.islice(items, max(start - offset, 0), None):
                    readable = readable or not isinstance(item, str)
                    yield item
            unreadable = 0 if readable else unreadable + 1
            if unreadable > give_up:
                raise ConfigError(f"{unreadable} shards in a row could not be read (last: {item}). Check "
                                  "the shard URLs, and the object-store client and credentials of pipe: URLs.")

    def _fetch(self, slot: int, slots: int, key: str, numbers: list[int]) -> dict[int, dict[str, Any] | Skip]:
        """The items of the slot's stream with these numbers, opening only the shards that hold them."""
        wanted, found = sorted(set(numbers)), {}
        for i, offset in self._shards(slot, slots, key):
            if not wanted or offset > wanted[-1]:
                return found
            end = offset + self.shards.samples[i]
            first = bisect.bisect_left(wanted, offset)
            if first == len(wanted) or wanted[first] >= end:
                continue
            last = bisect.bisect_left(wanted, end)
            here = set(wanted[first:last])
            with contextlib.closing(_shard_items(self.shards.urls[i], self.shards.samples[i], self.tar_reader,
                                                 self.stall_timeout_s)) as items:
                for n, item in enumerate(itertools.islice(items, wanted[last - 1] - offset + 1), offset):
                    if n in here:
                        found[n] = item
        return found

    def _stream(self, slot: int, slots: int, key: str, start: int) -> Iterator[dict[str, Any] | Skip]:
        """The slot's shuffled items from output number `start` on."""
        if self.shuffle_buffer <= 1:
            return self._items(slot, slots, key, start)
        rng = random.Random(f"{key}:{self.epoch}:{slot}")
        shuffle = ShuffleBuffer(self.shuffle_buffer, 100, rng)
        if start:
            # the same buffer over item numbers, `start` outputs on: which items it holds, how many it took
            replay = ShuffleBuffer(self.shuffle_buffer, 100, rng)  # moves `rng` to where the stream stood
            for _ in zip(range(start), replay(itertools.count()), strict=False):
                pass
            held = self._fetch(slot, slots, key, replay.items)
            shuffle.items = [held[n] for n in replay.items]
            shuffle.taken = replay.taken
        return shuffle(self._items(slot, slots, key, shuffle.taken))

    def __iter__(self) -> Iterator[WorkerBatch]:
        worker, workers = _worker()
        quota = _share(self.steps - self.skip, workers, worker)
        if self.positions is None:  # a fresh shard order for the rest of the epoch
            original, start, key = worker, 0, f"{self.seed}:{self.skip}"
        else:
            # DataLoader takes its workers' batches in turn, so batch b of the epoch came from worker
            # b % workers: after `skip` batches, this pass's worker 0 continues worker skip % workers
            original = (worker + self.skip) % workers
            start, key = self.positions[original], f"{self.seed}:0"
        slot, slots = self.rank * workers + original, self.world_size * workers
        items = self._stream(slot, slots, key, start)
        seeds = ((self.seed * 1_000_003 + self.epoch) * 1_009 + slot) << 40  # + the item's output number
        # An endless stream of nothing but corrupt samples would never fill a batch: give up after
        # twenty datasets' worth of failures in a row (a healthy stream essentially never gets there).
        give_up = 20 * self.shards.num_samples
        good: list[tuple[torch.Tensor, int]] = []
        problems: list[str] = []  # the first few descriptions; all are counted in `skipped`
        skipped: dict[str, int] = {}
        failures, position = 0, start
        while quota > 0:
            out = self.decode(next(items), seeds + position)
            position += 1
            if isinstance(out, str):
                skipped[out.reason] = skipped.get(out.reason, 0) + 1
                failures += 1
                if out and len(problems) < MAX_LOGGED_PROBLEMS:
                    problems.append(out)
                if failures > give_up:
                    raise ConfigError(f"no decodable sample in {give_up} tries (last: {out}). "
                                      "Check the shards with `deepres shard --verify`.")
                continue
            failures = 0
            good.append(out)
            if len(good) == self.batch_size:
                yield _collate(good, skipped, problems, self.shape, position)
                good, problems, skipped, quota = [], [], {}, quota - 1


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
        self.stall_timeout_s: float | None = None

    def _range(self, start: int, stop: int) -> Iterator[dict[str, Any] | Skip]:
        """Exactly stop - start items: global samples [start, stop) in index order."""
        offset = 0
        for url, count in zip(self.shards.urls, self.shards.samples, strict=True):
            lo, hi = max(start - offset, 0), min(stop - offset, count)
            if lo < hi:
                with contextlib.closing(_shard_items(url, count, self.tar_reader, self.stall_timeout_s)) as items:
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
            skips = [d for d in decoded if isinstance(d, str)]
            yield _collate(good, dict(Counter(d.reason for d in skips)), [d for d in skips if d], self.shape)
