"""Converting an image tree or the CIFAR archive into webdataset tar shards (`deepres shard SRC OUT`).

Layout written (one directory per split, an index beside the shards):

    OUT/train/train-000000.tar ... OUT/train/index.json
    OUT/val/val-000000.tar ...     OUT/val/index.json

Each sample is `<key>.jpg` (or `.png` for CIFAR) plus `<key>.cls` (the class index as text). Samples are
shuffled across classes with a seed, so a shard holds a mix of classes and a small shuffle buffer is
enough at training time. Shards are written to a temporary name and renamed when complete: an
interrupted run resumes by keeping the complete shards and rewriting the rest. The output is
deterministic (same source and options give byte-identical shards).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import hashlib
import io
import json
import random
import re
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from deepres.data.image_sources import SourceItem, SplitSource, _unpickle, find_splits
from deepres.data.shard_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    LABEL_FIELD,
    decode_rgb,
    describe_error,
    read_shard,
    sha256_file,
)
from deepres.data.shard_jobs import completed, log_progress, read_progress, write_json
from deepres.errors import ConfigError
from deepres.files import atomic_open

PLAN_NAME = ".deepres-shard-plan.json"
PROGRESS_NAME = ".deepres-shard-progress.jsonl"
DEFAULT_QUALITY = 95
# tar cost of one sample beyond the image bytes: two 512-byte headers, the label's data block, and on
# average half a block of padding after the image. Used to turn a byte target into samples per shard.
TAR_BYTES_PER_SAMPLE = 3 * 512 + 256


# ---------------------------------------------------------------- encoding one image


@dataclass(frozen=True)
class EncodeOptions:
    resize: int | None  # shorter side in pixels; images are only ever shrunk
    quality: int | None  # JPEG quality when re-encoding; None keeps source JPEG bytes when possible


@functools.lru_cache(maxsize=2)
def _cifar_batch(path: str) -> Any:
    return _unpickle(Path(path))[b"data"]


def _shrunk(img: Image.Image, resize: int | None) -> Image.Image:
    if resize is None or min(img.size) <= resize:
        return img
    w, h = img.size
    scale = resize / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)


def encode_item(item: SourceItem, root: Path, opts: EncodeOptions) -> tuple[str, bytes]:
    """(field, bytes) for one sample: CIFAR rows become PNG, everything else RGB JPEG."""
    if item.row >= 0:
        pixels = _cifar_batch(str(root / item.path))[item.row].reshape(3, 32, 32).transpose(1, 2, 0)
        out = io.BytesIO()
        _shrunk(Image.fromarray(pixels), opts.resize).save(out, "PNG")
        return "png", out.getvalue()
    data = (root / item.path).read_bytes()
    img = Image.open(io.BytesIO(data))
    needs_resize = opts.resize is not None and min(img.size) > opts.resize
    if img.format == "JPEG" and img.mode == "RGB" and not needs_resize and opts.quality is None:
        # Keep the original bytes, but decode once (at 1/8 scale, which still reads every byte) so a
        # truncated or corrupt file is caught here rather than in the training loop.
        img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
        img.load()
        return "jpg", data
    if needs_resize:
        img = decode_rgb(data, opts.resize)
    out = io.BytesIO()
    _shrunk(img.convert("RGB"), opts.resize).save(out, "JPEG", quality=opts.quality or DEFAULT_QUALITY)
    return "jpg", out.getvalue()


# ---------------------------------------------------------------- writing one shard


@dataclass(frozen=True)
class ShardTask:
    path: str  # final path; written to a temporary name first
    items: tuple[SourceItem, ...]
    root: str
    opts: EncodeOptions


@dataclass
class ShardRecord:
    name: str
    samples: int
    bytes: int
    sha256: str
    skipped: list[dict[str, str]] = field(default_factory=list)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed metadata so that the same input gives byte-identical shards
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def write_shard(task: ShardTask) -> ShardRecord:
    """Write one shard through deepres.files.atomic_open: a shard file that exists is complete."""
    final = Path(task.path)
    root = Path(task.root)
    skipped, samples = [], 0
    with atomic_open(final) as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in task.items:
            try:
                fieldname, data = encode_item(item, root, task.opts)
            except Exception as exc:  # any decoder error: a bad image is skipped, never fatal
                skipped.append({"source": item.path if item.row < 0 else f"{item.path}[{item.row}]",
                                "error": describe_error(exc)})
                continue
            _add_member(tar, f"{item.key}.{fieldname}", data)
            _add_member(tar, f"{item.key}.{LABEL_FIELD}", str(item.label).encode())
            samples += 1
    return ShardRecord(final.name, samples, final.stat().st_size, sha256_file(final), skipped)


# ---------------------------------------------------------------- planning and resuming a split


_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_shard_size(text: str) -> tuple[int, int]:
    """'1000' -> (1000 samples, 0); '256MB' / '1GiB' -> (0, bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?(b)?\s*", text, flags=re.IGNORECASE)
    if not m or (m.group(2) is None and m.group(3) is None and "." in m.group(1)):
        raise ConfigError(f"--shard-size {text!r}: give a sample count (1000) or a size (256MB, 1GiB).")
    if m.group(2) is None and m.group(3) is None:
        return int(m.group(1)), 0
    return 0, int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def samples_per_shard(split: SplitSource, items: list[SourceItem], shard_size: str, opts: EncodeOptions) -> int:
    """Samples per shard; a byte target is turned into a count from a deterministic sample of encodings."""
    count, target_bytes = parse_shard_size(shard_size)
    if count:
        return count
    sizes = []
    for item in items[:64]:
        try:
            sizes.append(len(encode_item(item, split.root, opts)[1]) + TAR_BYTES_PER_SAMPLE)
        except Exception:  # counted and reported when the shard is written
            continue
        if len(sizes) == 32:
            break
    mean = sum(sizes) / len(sizes) if sizes else 1.0
    return max(1, int(target_bytes // mean))


def plan_split(split: SplitSource, shard_size: str, opts: EncodeOptions, seed: int) -> list[list[SourceItem]]:
    """The samples of every shard: all items shuffled across classes with `seed`, then cut in order."""
    items = list(split.items)
    random.Random(f"{seed}:{split.name}").shuffle(items)
    per_shard = samples_per_shard(split, items, shard_size, opts)
    return [items[i : i + per_shard] for i in range(0, len(items), per_shard)]


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def plan_fingerprint(split: SplitSource, plan: list[list[SourceItem]], opts: EncodeOptions) -> str:
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, split.name, split.classes, asdict(opts)]).encode())
    for i, items in enumerate(plan):
        digest.update(f"#{i}".encode())
        for it in items:
            digest.update(f"{it.key}\0{it.label}\0{it.path}\0{it.row}\n".encode())
    return digest.hexdigest()


def _rescan(path: Path) -> ShardRecord | None:
    """Record for a complete shard file that the interrupted run did not get to log; None if unreadable."""
    try:
        samples = sum(1 for _ in read_shard(str(path)))
    except Exception:
        return None
    return ShardRecord(path.name, samples, path.stat().st_size, sha256_file(path))


def _prepare_out(out: Path, fingerprint: str, overwrite: bool) -> bool:
    """Make `out` ready for this plan; True if a finished index for the same plan is already there."""
    out.mkdir(parents=True, exist_ok=True)
    previous = None
    for name in (INDEX_NAME, PLAN_NAME):
        if (out / name).is_file():
            previous = json.loads((out / name).read_text()).get("fingerprint")
            if previous == fingerprint:
                return name == INDEX_NAME
            break
    has_shards = any(out.glob("*.tar"))
    if (previous is not None or has_shards) and not overwrite:
        raise ConfigError(
            f"{out} already holds shards from a different conversion (other source files or options). "
            "Write to a new output directory, or pass --overwrite to delete them."
        )
    for p in [*out.glob("*.tar"), out / INDEX_NAME, out / PLAN_NAME, out / PROGRESS_NAME]:
        p.unlink(missing_ok=True)
    return False


# ---------------------------------------------------------------- converting


@dataclass
class ConvertOptions:
    shard_size: str = "1000"
    resize: int | None = None
    quality: int | None = None
    seed: int = 0
    workers: int = 1
    overwrite: bool = False


def convert_split(split: SplitSource, out_root: Path, opts: ConvertOptions,
                  pool: cf.Executor | None) -> dict[str, Any]:
    """Write (or finish writing) the shards of one split and its index; returns the index."""
    from tqdm import tqdm

    enc = EncodeOptions(opts.resize, opts.quality)
    plan = plan_split(split, opts.shard_size, enc, opts.seed)
    fingerprint = plan_fingerprint(split, plan, enc)
    out = out_root / split.name
    if _prepare_out(out, fingerprint, opts.overwrite):
        print(f"{out}: already complete", file=sys.stderr)
        return json.loads((out / INDEX_NAME).read_text())
    write_json(out / PLAN_NAME, {"fingerprint": fingerprint})
    for tmp in out.glob(".*.tmp-*"):  # partial shards of an interrupted run (deepres.files.temporary_path)
        tmp.unlink()

    logged = read_progress(out / PROGRESS_NAME, ShardRecord)
    records: dict[str, ShardRecord] = {}
    pending: list[ShardTask] = []
    for i, items in enumerate(plan):
        path = out / shard_name(split.name, i)
        rec = logged.get(path.name)
        if path.is_file() and (rec is None or rec.bytes != path.stat().st_size):
            rec = _rescan(path)
        if path.is_file() and rec is not None:
            records[path.name] = rec
        else:
            pending.append(ShardTask(str(path), tuple(items), str(split.root), enc))

    done = sum(r.samples + len(r.skipped) for r in records.values())
    with open(out / PROGRESS_NAME, "a") as progress, tqdm(
        total=len(split.items), initial=done, unit="img", desc=split.name, dynamic_ncols=True
    ) as bar:
        for rec in completed(write_shard, pending, pool):
            records[rec.name] = rec
            log_progress(progress, rec)
            for bad in rec.skipped:
                bar.write(f"skipped {bad['source']}: {bad['error']}", file=sys.stderr)
            bar.update(rec.samples + len(rec.skipped))

    shards = [records[shard_name(split.name, i)] for i in range(len(plan))]
    index = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "split": split.name,
        "classes": split.classes,
        "num_classes": len(split.classes),
        "num_samples": sum(r.samples for r in shards),
        "shards": [{"name": r.name, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256} for r in shards],
        "skipped": split.skipped + [bad for r in shards for bad in r.skipped],
        "options": {"resize": opts.resize, "quality": opts.quality, "seed": opts.seed,
                    "samples_per_shard": len(plan[0]) if plan else 0},
        "fingerprint": fingerprint,
    }
    write_json(out / INDEX_NAME, index)
    (out / PLAN_NAME).unlink()
    (out / PROGRESS_NAME).unlink()
    return index


def convert(src: Path, out: Path, fmt: str, split: str | None, val_labels: Path | None,
            opts: ConvertOptions) -> list[dict[str, Any]]:
    splits = find_splits(src, fmt, split, val_labels)
    for s in splits:
        if not s.items:
            raise ConfigError(f"no images found for split {s.name!r} under {src}.")
    if opts.workers <= 1:
        return [convert_split(s, out, opts, None) for s in splits]
    with cf.ProcessPoolExecutor(opts.workers) as pool:
        return [convert_split(s, out, opts, pool) for s in splits]
