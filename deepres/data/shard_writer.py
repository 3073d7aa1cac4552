"""`deepres shard`: turn an image tree or the CIFAR archive into webdataset tar shards.

    deepres shard ~/data/imagenet ~/data/imagenet-shards --resize 320 --workers 16
    deepres shard --verify ~/data/imagenet-shards

Layout written (one directory per split, an index beside the shards):

    OUT/train/train-000000.tar ... OUT/train/index.json
    OUT/val/val-000000.tar ...     OUT/val/index.json

Each sample is `<key>.jpg` (or `.png` for CIFAR) plus `<key>.cls` (the class index as text). Samples are
shuffled across classes with a seed, so a shard holds a mix of classes and a small shuffle buffer is
enough at training time. Shards are written to a temporary name and renamed when complete: an
interrupted run resumes by keeping the complete shards and rewriting the rest. The output is
deterministic (same source and options give byte-identical shards).

This module also holds the index format and the shard reader shared with `deepres.data.shards`; it must
not import Lightning, so that `deepres shard` starts fast.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import functools
import hashlib
import io
import json
import os
import pickle
import random
import re
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from deepres.errors import ConfigError

FORMAT_NAME = "deepres-webdataset-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
PLAN_NAME = ".deepres-shard-plan.json"
PROGRESS_NAME = ".deepres-shard-progress.jsonl"
IMAGE_FIELDS = ("jpg", "png")
LABEL_FIELD = "cls"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}
DEFAULT_QUALITY = 95
# tar cost of one sample beyond the image bytes: two 512-byte headers, the label's data block, and on
# average half a block of padding after the image. Used to turn a byte target into samples per shard.
TAR_BYTES_PER_SAMPLE = 3 * 512 + 256


# ---------------------------------------------------------------- reading shards (shared with the loader)


def read_index(location: str) -> dict[str, Any]:
    """Load an index.json from a local path or any URL webdataset can open (e.g. `pipe:aws s3 cp ... -`)."""
    from webdataset.gopen import gopen

    try:
        with gopen(location, "rb") as stream:
            index = json.loads(stream.read())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the shard index {location!r} ({exc}). Point the index option at the "
            f"{INDEX_NAME} that `deepres shard` wrote beside the shards."
        ) from exc
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"{location} is not a deepres shard index of version {FORMAT_VERSION} "
            f"(format={index.get('format')!r}, version={index.get('version')!r}). Rewrite the shards "
            "with this version of `deepres shard`."
        )
    return index


def _read_exactly(stream: Any, n: int) -> bytes:
    chunks, left = [], n
    while left > 0:  # pipes return short reads
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _tar_number(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for sizes beyond 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _pax_path(data: bytes) -> str | None:
    for record in data.decode("utf-8", "replace").splitlines():
        key, _, value = record.partition(" ")[2].partition("=")
        if key == "path":
            return value
    return None


def iter_tar(stream: Any) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file in an uncompressed tar stream (ustar, pax, GNU long names).

    Python's tarfile spends ~0.15 ms parsing each header, a tenth of a small JPEG's decode time, so
    shards are read with this lean parser. A cut-off archive raises tarfile.ReadError.
    """
    long_name: str | None = None
    while True:
        header = _read_exactly(stream, 512)
        if not header or header == bytes(512):  # end of archive (or of a stream cut at a member boundary)
            return
        if len(header) < 512:
            raise tarfile.ReadError("unexpected end of data in a tar header")
        if _tar_number(header[148:156]) != sum(header[:148]) + 256 + sum(header[156:]):
            raise tarfile.ReadError("bad tar header checksum")
        size, kind = _tar_number(header[124:136]), header[156:157]
        data = _read_exactly(stream, size)
        if len(data) < size:
            raise tarfile.ReadError(f"unexpected end of data: {len(data)} of {size} bytes of a tar member")
        _read_exactly(stream, -size % 512)
        if kind == b"x":
            long_name = _pax_path(data) or long_name
        elif kind == b"L":
            long_name = data.rstrip(b"\0").decode("utf-8", "replace")
        elif kind in (b"0", b"\0", b"7"):
            name = header[:100].rstrip(b"\0").decode("utf-8", "replace")
            prefix = header[345:500].rstrip(b"\0").decode("utf-8", "replace") if header[257:262] == b"ustar" else ""
            yield long_name or (f"{prefix}/{name}" if prefix else name), data
            long_name = None
        elif kind != b"g":  # directories, links, devices: not samples
            long_name = None


_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # key = path up to the first dot of the file name


def group_samples(members: Iterable[tuple[str, bytes]]) -> Iterator[dict[str, Any]]:
    """Consecutive members sharing a key become one sample {__key__, <field>: bytes}, as in webdataset."""
    sample: dict[str, Any] | None = None
    for name, data in members:
        m = _MEMBER.match(name)
        if m is None:
            continue
        key, fieldname = m.group(1), m.group(2).lower()
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key}
        sample[fieldname] = data
    if sample is not None:
        yield sample


def read_shard(url: str) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard, in order: dicts with `__key__`, `__url__`, an image field and `cls`.

    `url` may be a path or any URL webdataset's gopen opens (`pipe:`, `file:`, http, ...). Errors
    (missing file, truncated tar, failing pipe command) propagate to the caller.
    """
    from webdataset.gopen import gopen

    stream = gopen(url, "rb")
    finished = False
    try:
        for sample in group_samples(iter_tar(stream)):
            sample["__url__"] = url
            yield sample
        finished = True
    finally:
        if finished:  # a `pipe:` command that failed reports it here, when it is waited for
            stream.close()
        else:  # the reader stopped early or the tar broke: that, not the command's exit status, is the news
            with contextlib.suppress(Exception):
                stream.close()


def sample_image(sample: dict[str, Any]) -> bytes:
    for name in IMAGE_FIELDS:
        if name in sample:
            return sample[name]
    raise ValueError(f"no image field ({'/'.join(IMAGE_FIELDS)}) in sample {sample.get('__key__')!r}")


def sample_label(sample: dict[str, Any], num_classes: int) -> int:
    if LABEL_FIELD not in sample:
        raise ValueError(f"no {LABEL_FIELD} field in sample {sample.get('__key__')!r}")
    label = int(sample[LABEL_FIELD])
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} of sample {sample.get('__key__')!r} is outside [0, {num_classes})")
    return label


def describe_error(exc: BaseException) -> str:
    # PIL names the in-memory buffer ("<_io.BytesIO object at 0x...>"), which tells the user nothing
    return re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(exc).__name__}: {exc}")


def decode_rgb(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode to RGB; JPEGs whose shorter side exceeds 2*min_side are decoded at 1/2..1/8 scale.

    `Image.draft` makes libjpeg skip the work for pixels that a later downscale would throw away; the
    result keeps a shorter side of at least `min_side`, so callers choose `min_side` to lose nothing.
    """
    img = Image.open(io.BytesIO(data))
    if min_side is not None and img.format == "JPEG":
        w, h = img.size
        s = min(w, h)
        if s > 2 * min_side:
            img.draft("RGB", (-(-w * min_side // s), -(-h * min_side // s)))
    return img if img.mode == "RGB" else img.convert("RGB")  # convert() would copy an RGB image


# ---------------------------------------------------------------- finding the source images


@dataclass(frozen=True)
class SourceItem:
    """One source image: a file, or row `row` of a CIFAR pickle batch when row >= 0."""

    key: str
    label: int
    path: str
    row: int = -1


@dataclass
class SplitSource:
    name: str
    classes: list[str]
    items: list[SourceItem]
    root: Path
    skipped: list[dict[str, str]] = field(default_factory=list)


def _safe_key(text: str) -> str:
    # webdataset splits a member name at its first dot into key and field, so keys hold no dots.
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


class _KeyMaker:
    """Unique, dot-free sample keys: the file stem, prefixed with the class when stems collide."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, stem: str, class_name: str) -> str:
        key = _safe_key(stem)
        if key in self.seen:
            key = _safe_key(f"{class_name}_{stem}")
        base, n = key, 1
        while key in self.seen:
            key, n = f"{base}_{n}", n + 1
        self.seen.add(key)
        return key


def _image_files(folder: Path) -> list[Path]:
    # not is_dir() rather than is_file(): a file we cannot read is reported at conversion, not hidden
    return sorted(
        Path(e.path)
        for e in os.scandir(folder)
        if not e.is_dir() and Path(e.name).suffix.lower() in IMAGE_SUFFIXES
    )


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _class_folder_split(name: str, folder: Path, root: Path, classes: list[str] | None) -> SplitSource:
    found = _class_dirs(folder)
    if not found:
        raise ConfigError(
            f"{folder} has no class sub-folders. Expected {folder}/<class>/<image> "
            "(or pass --format cifar for the CIFAR python archive)."
        )
    classes = classes or found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ConfigError(
            f"{folder} has classes that the train split does not: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}. Both splits must use the same class folders."
        )
    label_of = {c: i for i, c in enumerate(classes)}
    keys = _KeyMaker()
    items = [
        SourceItem(keys(p.stem, c), label_of[c], str(p.relative_to(root)))
        for c in found
        for p in _image_files(folder / c)
    ]
    return SplitSource(name, list(classes), items, root)


def _devkit_labels(ground_truth: Path) -> dict[str, str]:
    """Flat val/ labels from ILSVRC2012_validation_ground_truth.txt and the devkit's meta.mat."""
    meta = ground_truth.parent / "meta.mat"
    if not meta.is_file():
        raise ConfigError(f"{meta} is missing: the devkit's meta.mat maps ILSVRC2012 ids to class folders.")
    from scipy.io import loadmat

    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    wnid_of_id = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    ids = [int(line) for line in ground_truth.read_text().split()]
    return {f"ILSVRC2012_val_{i:08d}": wnid_of_id[gid] for i, gid in enumerate(ids, start=1)}


def _csv_labels(solution: Path) -> dict[str, str]:
    """Flat val/ labels from Kaggle's LOC_val_solution.csv (ImageId,PredictionString)."""
    labels = {}
    for line in solution.read_text().splitlines()[1:]:
        if line.strip():
            image_id, prediction = line.split(",", 1)
            labels[image_id.strip()] = prediction.split()[0]
    return labels


def _flat_val_labels(src: Path, val_labels: Path | None) -> dict[str, str]:
    candidates = [val_labels] if val_labels else [
        src / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt",
        src / "LOC_val_solution.csv",
    ]
    for path in candidates:
        if path is not None and path.is_file():
            return _csv_labels(path) if path.suffix == ".csv" else _devkit_labels(path)
    raise ConfigError(
        f"{src / 'val'} holds images but no class folders, and no ground truth was found. Pass "
        "--val-labels with the devkit's data/ILSVRC2012_validation_ground_truth.txt (meta.mat beside it) "
        "or Kaggle's LOC_val_solution.csv, or put val/ into per-class folders."
    )


def _flat_val_split(src: Path, classes: list[str] | None, val_labels: Path | None) -> SplitSource:
    labels = _flat_val_labels(src, val_labels)
    classes = classes or sorted(set(labels.values()))
    label_of = {c: i for i, c in enumerate(classes)}
    keys = _KeyMaker()
    items, skipped = [], []
    for p in _image_files(src / "val"):
        wnid = labels.get(p.stem)
        if wnid is None or wnid not in label_of:
            skipped.append({"source": str(p.relative_to(src)), "error": f"no known label ({wnid})"})
            continue
        items.append(SourceItem(keys(p.stem, wnid), label_of[wnid], str(p.relative_to(src))))
    return SplitSource("val", classes, items, src, skipped)


def _imagenet_splits(src: Path, only: str | None, val_labels: Path | None) -> list[SplitSource]:
    train, val = src / "train", src / "val"
    if not train.is_dir() and not val.is_dir():
        raise ConfigError(f"{src} has neither train/ nor val/. Expected the ImageNet layout {src}/train/<wnid>/*.")
    classes = _class_dirs(train) if train.is_dir() else None
    splits = []
    if train.is_dir() and only in (None, "train"):
        splits.append(_class_folder_split("train", train, src, classes))
    if val.is_dir() and only in (None, "val"):
        if _class_dirs(val):
            splits.append(_class_folder_split("val", val, src, classes))
        else:
            splits.append(_flat_val_split(src, classes, val_labels))
    if not splits:
        raise ConfigError(f"{src} has no {only}/ folder to convert.")
    return splits


def _unpickle(path: Path) -> dict[bytes, Any]:
    # The CIFAR archive is a set of Python pickles: only convert archives from a trusted source.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_splits(src: Path, only: str | None) -> list[SplitSource]:
    if (src / "batches.meta").is_file():  # CIFAR-10
        classes = [c.decode() for c in _unpickle(src / "batches.meta")[b"label_names"]]
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "val": ["test_batch"]}
        label_key = b"labels"
    elif (src / "meta").is_file():  # CIFAR-100
        classes = [c.decode() for c in _unpickle(src / "meta")[b"fine_label_names"]]
        files, label_key = {"train": ["train"], "val": ["test"]}, b"fine_labels"
    else:
        raise ConfigError(
            f"{src} is not an extracted CIFAR python archive (no batches.meta or meta). Extract "
            "cifar-10-python.tar.gz or cifar-100-python.tar.gz and pass the folder it creates."
        )
    splits = []
    for name, batch_files in files.items():
        if only not in (None, name):
            continue
        items = []
        for batch_file in batch_files:
            batch = _unpickle(src / batch_file)
            for row, label in enumerate(batch[label_key]):
                items.append(SourceItem(f"{batch_file}_{row:05d}", int(label), batch_file, row))
        splits.append(SplitSource(name, classes, items, src))
    return splits


def detect_format(src: Path) -> str:
    if (src / "batches.meta").is_file() or (src / "meta").is_file():
        return "cifar"
    if (src / "train").is_dir() or (src / "val").is_dir():
        return "imagenet"
    return "folder"


def find_splits(src: Path, fmt: str, split: str | None, val_labels: Path | None) -> list[SplitSource]:
    """The splits to convert, each with its sorted class list and source items."""
    if not src.is_dir():
        raise ConfigError(f"source {src} is not a directory.")
    fmt = detect_format(src) if fmt == "auto" else fmt
    if fmt == "imagenet":
        return _imagenet_splits(src, split, val_labels)
    if fmt == "cifar":
        return _cifar_splits(src, split)
    return [_class_folder_split(split or "train", src, src, None)]


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
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


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


# ---------------------------------------------------------------- verifying


def _verify_shard(path: Path, entry: dict, num_classes: int, decode: bool) -> str | None:
    """None if the shard matches its index entry, else what is wrong with it."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry["bytes"]:
        return f"size {path.stat().st_size} bytes, index says {entry['bytes']} (truncated or rewritten)"
    keys: set[str] = set()
    try:
        for sample in read_shard(str(path)):
            sample_label(sample, num_classes)
            data = sample_image(sample)
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
    if (out / INDEX_NAME).is_file():
        return [out / INDEX_NAME]
    found = sorted(out.glob(f"*/{INDEX_NAME}"))
    if not found:
        raise ConfigError(f"no {INDEX_NAME} in {out} or its sub-folders: is this a `deepres shard` output?")
    return found


def verify(out: Path, workers: int, decode: bool) -> int:
    """Re-read every shard and compare it with its index; prints each bad shard, returns 0 if all good."""
    bad = 0
    for index_path in _index_files(out):
        index = read_index(str(index_path))
        entries = index["shards"]
        paths = [index_path.parent / e["name"] for e in entries]
        args = (paths, entries, [index["num_classes"]] * len(entries), [decode] * len(entries))
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
        if sum(e["samples"] for e in entries) != index["num_samples"]:
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
        description="Convert an image tree or the CIFAR archive into webdataset tar shards, or verify them.",
        epilog="Formats: imagenet = SRC/train/<class>/* and SRC/val/ (per-class folders, or flat with the "
        "devkit ground truth); folder = SRC/<class>/*; cifar = the extracted python archive.",
    )
    p.add_argument("paths", nargs="+", metavar="SRC OUT", help="source directory and output directory")
    p.add_argument("--verify", action="store_true", help="re-read the shards in OUT and check them against the index")
    p.add_argument("--decode", action="store_true", help="with --verify: also decode every image (slower)")
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


def main(argv: Iterable[str] | None = None) -> int:
    args = _parser().parse_args(None if argv is None else list(argv))
    try:
        if args.verify:
            if len(args.paths) != 1:
                raise ConfigError("--verify takes one directory: deepres shard --verify OUT")
            return verify(Path(args.paths[0]), args.workers, args.decode)
        if len(args.paths) != 2:
            raise ConfigError("give a source and an output directory: deepres shard SRC OUT")
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
