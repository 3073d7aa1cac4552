"""`deepres shard`: write webdataset tar shards from an image tree or the CIFAR archive, index shards
that something else wrote, and verify either against its index.

    deepres shard ~/data/imagenet ~/data/imagenet-shards --resize 320 --workers 16
    deepres shard --index ~/data/laion-shards                       # shards written by another tool
    deepres shard --index '/data/in1k/imagenet1k-train-{0000..1023}.tar' --out /data/in1k/train.json
    deepres shard --verify ~/data/imagenet-shards

Layout written (one directory per split, an index beside the shards):

    OUT/train/train-000000.tar ... OUT/train/index.json
    OUT/val/val-000000.tar ...     OUT/val/index.json

Each sample is `<key>.jpg` (or `.png` for CIFAR) plus `<key>.cls` (the class index as text). Samples are
shuffled across classes with a seed, so a shard holds a mix of classes and a small shuffle buffer is
enough at training time. Shards are written to a temporary name and renamed when complete: an
interrupted run resumes by keeping the complete shards and rewriting the rest. The output is
deterministic (same source and options give byte-identical shards).

The shard format and reader live in `deepres.data.shard_format`, the discovery of source images in
`deepres.data.image_sources`; none of them imports Lightning, so that `deepres shard` starts fast.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import glob
import hashlib
import io
import json
import os
import random
import re
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
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
    SampleFields,
    decode_rgb,
    describe_error,
    is_local,
    read_index,
    read_shard,
    sha256_file,
)
from deepres.errors import ConfigError
from deepres.files import atomic_write_bytes

PLAN_NAME = ".deepres-shard-plan.json"
PROGRESS_NAME = ".deepres-shard-progress.jsonl"
INDEX_PROGRESS_SUFFIX = ".progress.jsonl"  # beside the index that `--index` is writing
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


def _sha256(path: Path) -> str:
    return sha256_file(path)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # fixed metadata so that the same input gives byte-identical shards
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def write_shard(task: ShardTask) -> ShardRecord:
    """Write one shard to `<name>.tmp`, fsync, then rename: a shard file that exists is complete."""
    final = Path(task.path)
    tmp = final.with_name(final.name + ".tmp")
    root = Path(task.root)
    skipped, samples = [], 0
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
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
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    return ShardRecord(final.name, samples, final.stat().st_size, _sha256(final), skipped)


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


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _existing_records(out: Path) -> dict[str, ShardRecord]:
    records = {}
    progress = out / PROGRESS_NAME
    if progress.is_file():
        for line in progress.read_text().splitlines():
            try:
                rec = ShardRecord(**json.loads(line))
            except (ValueError, TypeError):  # a line cut short by the interruption
                continue
            records[rec.name] = rec
    return records


def _rescan(path: Path) -> ShardRecord | None:
    """Record for a complete shard file that the interrupted run did not get to log; None if unreadable."""
    try:
        samples = sum(1 for _ in read_shard(str(path)))
    except Exception:
        return None
    return ShardRecord(path.name, samples, path.stat().st_size, _sha256(path))


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


def _completed(fn: Callable[[ShardTask], ShardRecord], tasks: list[ShardTask],
               pool: cf.Executor | None) -> Iterator[ShardRecord]:
    """Results as they finish, so progress is logged the moment each shard is renamed into place."""
    if pool is None:
        yield from map(fn, tasks)
        return
    futures = [pool.submit(fn, t) for t in tasks]
    try:
        for fut in cf.as_completed(futures):
            yield fut.result()
    finally:
        for fut in futures:
            fut.cancel()


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
    _write_json(out / PLAN_NAME, {"fingerprint": fingerprint})
    for tmp in out.glob("*.tmp"):  # partial shards of an interrupted run
        tmp.unlink()

    logged = _existing_records(out)
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
        for rec in _completed(write_shard, pending, pool):
            records[rec.name] = rec
            progress.write(json.dumps(asdict(rec)) + "\n")
            progress.flush()
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
    _write_json(out / INDEX_NAME, index)
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


# ---------------------------------------------------------------- indexing shards written by other tools


@dataclass
class IndexRecord:
    """What one pass over a shard found; `mtime_ns` and `bytes` tell a resumed run whether it changed."""

    name: str
    samples: int
    bytes: int
    mtime_ns: int
    sha256: str
    labels: dict[str, int]  # label as stored (index or class name) -> samples with it
    unusable: int  # samples without an image or a label field (skipped when training)
    first_problem: str = ""


@dataclass(frozen=True)
class IndexTask:
    path: str
    name: str
    fields: SampleFields


def scan_shard(task: IndexTask) -> IndexRecord:
    """Count the samples and labels of one shard (reading it through once) and checksum it."""
    stat = os.stat(task.path)
    labels: dict[str, int] = {}
    samples = unusable = 0
    problem = ""
    try:
        for sample in read_shard(task.path):
            samples += 1
            try:
                task.fields.image_bytes(sample)
                label = str(task.fields.raw_label(sample))
            except ValueError as exc:
                unusable += 1
                problem = problem or str(exc)
                continue
            labels[label] = labels.get(label, 0) + 1
    except Exception as exc:
        raise ConfigError(f"{task.path} is not a readable tar shard after {samples} samples: "
                          f"{describe_error(exc)}.") from exc
    return IndexRecord(task.name, samples, stat.st_size, stat.st_mtime_ns, sha256_file(task.path), labels,
                       unusable, problem)


def _shard_paths(source: str) -> tuple[list[Path], Path]:
    """The local shard files a directory or brace/glob pattern names, and the default index path."""
    from webdataset.shardlists import expand_urls

    if not is_local(source):
        raise ConfigError(f"--index {source!r}: index local shard files (copy or mount remote ones first); "
                          "the loader then reads them from anywhere with data.train_urls.")
    path = Path(source).expanduser()
    if not path.exists() and not glob.has_magic(source) and "{" not in source:
        raise ConfigError(f"--index {source!r}: no such folder or file. Give the folder that holds the shards "
                          "or a pattern such as '/data/train-{000000..000146}.tar'.")
    if path.is_dir():
        shards, where = sorted(path.glob("*.tar")), path
    else:  # brace ranges as webdataset expands them, then shell-style wildcards
        shards = [Path(p) for pattern in expand_urls(str(path))
                  for p in (sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])]
        where = shards[0].parent if shards else path.parent
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise ConfigError(f"--index {source!r}: {len(missing)} of {len(shards)} shard files do not exist, "
                              f"e.g. {missing[0]}.")
    if not shards:
        raise ConfigError(f"--index {source!r}: no .tar shards there. Give the folder that holds them or a "
                          "pattern such as '/data/train-{000000..000146}.tar'.")
    return shards, where / INDEX_NAME


def _classes_from_labels(labels: set[str], num_classes: int | None) -> list[str]:
    """Class list for the labels seen: indices 0..K-1 (K = num_classes or the largest + 1), or sorted names."""
    as_ints = [int(v) for v in labels if re.fullmatch(r"-?\d+", v)]
    if len(as_ints) == len(labels):
        k = num_classes if num_classes is not None else max(as_ints, default=-1) + 1
        if as_ints and (min(as_ints) < 0 or max(as_ints) >= k):
            raise ConfigError(f"labels range over [{min(as_ints)}, {max(as_ints)}], outside --num-classes {k}.")
        return [str(i) for i in range(k)]
    if as_ints:
        raise ConfigError("the shards mix class indices and class names in their labels; use one label field "
                          "that holds either (--label-field).")
    names = sorted(labels)
    if num_classes is not None and num_classes != len(names):
        raise ConfigError(f"the shards name {len(names)} classes, --num-classes says {num_classes}.")
    return names


def index_shards(source: str, out: Path | None, fields: SampleFields, workers: int,
                 num_classes: int | None = None) -> dict[str, Any]:
    """Write a deepres index for shards that deepres did not write; resumes an interrupted run."""
    from tqdm import tqdm

    shards, default_out = _shard_paths(source)
    out = (out or default_out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    names = [os.path.relpath(s, out.parent) for s in shards]
    progress = out.with_name(out.name + INDEX_PROGRESS_SUFFIX)
    done: dict[str, IndexRecord] = {}
    if progress.is_file():  # an interrupted run: keep what it counted for shards that did not change
        for line in progress.read_text().splitlines():
            try:
                rec = IndexRecord(**json.loads(line))
            except (ValueError, TypeError):  # a line cut short by the interruption
                continue
            done[rec.name] = rec
    tasks = []
    for path, name in zip(shards, names, strict=True):
        rec, stat = done.get(name), path.stat()
        if rec is None or (rec.bytes, rec.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            done.pop(name, None)
            tasks.append(IndexTask(str(path), name, fields))
    pool = cf.ProcessPoolExecutor(workers) if workers > 1 and len(tasks) > 1 else None
    try:
        with open(progress, "a") as log, tqdm(total=len(shards), initial=len(shards) - len(tasks), unit="shard",
                                              desc=f"indexing {out.parent}", dynamic_ncols=True) as bar:
            for rec in _completed(scan_shard, tasks, pool):
                done[rec.name] = rec
                log.write(json.dumps(asdict(rec)) + "\n")
                log.flush()
                bar.update(1)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    records = [done[n] for n in names]
    labels = {label for r in records for label in r.labels}
    if not labels:
        raise ConfigError(f"no sample in {source} has both an image field ({'/'.join(fields.image)}) and a "
                          f"label ({fields.label}); e.g. {next((r.first_problem for r in records if r.first_problem), '')}. "
                          "Set --image-fields / --label-field to the fields the shards use.")
    index = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "split": out.parent.name if out.name == INDEX_NAME else out.stem,
        "classes": _classes_from_labels(labels, num_classes),
        "num_classes": 0,
        "num_samples": sum(r.samples for r in records),
        "shards": [{"name": r.name, "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256} for r in records],
        "skipped": [],
        "fields": fields.as_dict(),
        "indexed": {"unusable_samples": sum(r.unusable for r in records),
                    "first_problem": next((r.first_problem for r in records if r.first_problem), ""),
                    "samples_per_class": {k: sum(r.labels.get(k, 0) for r in records) for k in sorted(labels)}},
    }
    index["num_classes"] = len(index["classes"])
    _write_json(out, index)
    progress.unlink()
    return {**index, "path": str(out)}


# ---------------------------------------------------------------- verifying


def _verify_shard(path: Path, entry: dict, classes: list[str], fields: SampleFields, decode: bool) -> str | None:
    """None if the shard matches its index entry, else what is wrong with it."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry["bytes"]:
        return f"size {path.stat().st_size} bytes, index says {entry['bytes']} (truncated or rewritten)"
    class_index = {c: i for i, c in enumerate(classes)}
    keys: set[str] = set()
    try:
        for sample in read_shard(str(path)):
            fields.label_index(sample, len(classes), class_index)
            data = fields.image_bytes(sample)
            if decode:
                decode_rgb(data, 32).load()
            if sample["__key__"] in keys:
                return f"duplicate key {sample['__key__']!r}"
            keys.add(sample["__key__"])
    except Exception as exc:
        return f"unreadable after {len(keys)} samples: {describe_error(exc)}"
    if len(keys) != entry["samples"]:
        return f"{len(keys)} samples, index says {entry['samples']}"
    if _sha256(path) != entry["sha256"]:
        return "content differs from the index (sha256 mismatch)"
    return None


def _index_files(out: Path) -> list[Path]:
    if out.is_file():
        return [out]
    if (out / INDEX_NAME).is_file():
        return [out / INDEX_NAME]
    found = sorted(out.glob(f"*/{INDEX_NAME}"))
    if not found:
        raise ConfigError(f"no {INDEX_NAME} in {out} or its sub-folders: is this a `deepres shard` output? "
                          "Shards written by another tool get one with `deepres shard --index SHARDS`.")
    return found


def verify(out: Path, workers: int, decode: bool) -> int:
    """Re-read every shard and compare it with its index; prints each bad shard, returns 0 if all good."""
    bad = 0
    for index_path in _index_files(out):
        index = read_index(str(index_path))
        entries = index["shards"]
        fields = SampleFields.of(None, None, index.get("fields"))
        paths = [index_path.parent / e["name"] for e in entries]
        n = len(entries)
        args = (paths, entries, [index["classes"]] * n, [fields] * n, [decode] * n)
        if workers > 1:
            with cf.ProcessPoolExecutor(workers) as pool:
                problems = list(pool.map(_verify_shard, *args))
        else:
            problems = list(map(_verify_shard, *args))
        for path, problem in zip(paths, problems, strict=True):
            if problem:
                print(f"BAD {path}: {problem}", file=sys.stderr)
        n_bad = sum(p is not None for p in problems)
        total = sum(e["samples"] for e in entries)
        if total != index["num_samples"]:
            print(f"BAD {index_path}: shard sample counts add up to {total}, num_samples says "
                  f"{index['num_samples']}", file=sys.stderr)
            n_bad += 1
        status = "ok" if n_bad == 0 else f"{n_bad} bad"
        print(f"{index_path.parent}: {len(entries)} shards, {total} samples, {index['num_classes']} classes: {status}")
        bad += n_bad
    return 1 if bad else 0


# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepres shard",
        description="Convert an image tree or the CIFAR archive into webdataset tar shards, index shards "
        "written by another tool, or verify shards against their index.",
        epilog="Formats: imagenet = SRC/train/<class>/* and SRC/val/ (per-class folders, or flat with the "
        "devkit ground truth); folder = SRC/<class>/*; cifar = the extracted python archive.",
    )
    p.add_argument("paths", nargs="*", metavar="SRC OUT", help="source directory and output directory")
    p.add_argument("--verify", action="store_true", help="re-read the shards in OUT and check them against the index")
    p.add_argument("--decode", action="store_true", help="with --verify: also decode every image (slower)")
    p.add_argument("--index", metavar="SHARDS", help="write an index for existing webdataset shards: their "
                   "folder or a pattern ('/data/train-{000000..000146}.tar'); resumes if interrupted")
    p.add_argument("--out", type=Path, help=f"with --index: where to write the index (default: {INDEX_NAME} "
                   "beside the shards)")
    p.add_argument("--label-field", default=LABEL_FIELD, help="with --index: the field holding the label: "
                   "an extension (cls, label, txt) or json:KEY for a key of the .json sidecar")
    p.add_argument("--image-fields", default="jpg,jpeg,png,webp",
                   help="with --index: image extensions to look for, in order (comma-separated)")
    p.add_argument("--num-classes", type=int, help="with --index: number of classes when the labels are "
                   "indices and the largest class may be missing from the shards")
    p.add_argument("--format", default="auto", choices=["auto", "imagenet", "folder", "cifar"])
    p.add_argument("--split", help="imagenet/cifar: convert only this split (train or val); "
                   "folder: the split name to write (default train)")
    p.add_argument("--val-labels", type=Path, help="ground truth for a flat ImageNet val/: the devkit's "
                   "ILSVRC2012_validation_ground_truth.txt (meta.mat beside it) or LOC_val_solution.csv")
    p.add_argument("--shard-size", default="1000", help="samples per shard (1000) or bytes (256MB, 1GiB)")
    p.add_argument("--resize", type=int, help="shrink images whose shorter side is longer than this (pixels)")
    p.add_argument("--quality", type=int, help=f"re-encode every JPEG at this quality (default: keep source "
                   f"JPEG bytes, {DEFAULT_QUALITY} when an image must be re-encoded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle across classes")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    p.add_argument("--overwrite", action="store_true", help="delete shards of a different earlier conversion in OUT")
    return p


def _index_main(args: argparse.Namespace) -> int:
    if args.paths:
        raise ConfigError("--index takes the shards as its own argument: deepres shard --index SHARDS [--out FILE]")
    fields = SampleFields.of([f.strip() for f in args.image_fields.split(",") if f.strip()], args.label_field)
    index = index_shards(args.index, args.out, fields, args.workers, args.num_classes)
    unusable = index["indexed"]["unusable_samples"]
    note = (f"; {unusable} samples lack an image or label and will be skipped "
            f"(e.g. {index['indexed']['first_problem']})") if unusable else ""
    print(f"{index['path']}: {len(index['shards'])} shards, {index['num_samples']} samples, "
          f"{index['num_classes']} classes{note}")
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    args = _parser().parse_args(None if argv is None else list(argv))
    try:
        if args.index is not None:
            return _index_main(args)
        if args.verify:
            if len(args.paths) != 1:
                raise ConfigError("--verify takes one directory: deepres shard --verify OUT")
            return verify(Path(args.paths[0]), args.workers, args.decode)
        if len(args.paths) != 2:
            raise ConfigError("give a source and an output directory: deepres shard SRC OUT "
                              "(or index existing shards: deepres shard --index SHARDS)")
        if args.quality is not None and not 1 <= args.quality <= 100:
            raise ConfigError(f"--quality {args.quality}: JPEG quality must be between 1 and 100.")
        if args.resize is not None and args.resize < 1:
            raise ConfigError(f"--resize {args.resize}: give the shorter side in pixels (e.g. 320).")
        opts = ConvertOptions(args.shard_size, args.resize, args.quality, args.seed, args.workers, args.overwrite)
        parse_shard_size(opts.shard_size)
        indexes = convert(Path(args.paths[0]), Path(args.paths[1]), args.format, args.split, args.val_labels, opts)
    except ConfigError as exc:
        print(f"deepres shard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepres shard: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    for index in indexes:
        skipped = f", {len(index['skipped'])} images skipped (listed in index.json)" if index["skipped"] else ""
        print(f"{Path(args.paths[1]) / index['split']}: {len(index['shards'])} shards, "
              f"{index['num_samples']} samples, {index['num_classes']} classes{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
