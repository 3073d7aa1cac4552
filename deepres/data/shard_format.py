"""The shard format the loader reads: tar shards, their sample fields, and the lists that count them.

A shard is an uncompressed tar file in webdataset's layout: members `<key>.<field>` that share a key
form one sample (`n01440764_10026.jpg` + `n01440764_10026.cls`). Which field holds the image and
which the label is configurable (`SampleFields`), so shards written by webdataset's `ShardWriter`,
img2dataset or the public ImageNet webdataset copies are read as they are.

The loader needs the number of samples in every shard before it starts (that is what gives every
rank the same number of steps). It takes them from one of three shard lists:

- deepres's `index.json` (written by `deepres shard`, or by `deepres shard --index` for shards
  written by anything else): shard names, sample counts, classes, sizes and sha256 checksums;
- a wids shard list (webdataset's indexed datasets): `{"shardlist": [{"url": ..., "nsamples": ...}]}`,
  URLs relative to the list's own location;
- a timm `_info.json`: `{"splits": {"train": {"filenames": [...], "shard_lengths": [...]}}}`.

This module must not import Lightning or torch: `deepres shard` imports it and starts fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath
import re
import signal
import tarfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from deepres.errors import ConfigError

FORMAT_NAME = "deepres-webdataset-shards"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"
TIMM_INFO_NAME = "_info.json"
# image fields tried in order (the fields timm's webdataset reader tries, plus jpeg)
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
LABEL_FIELD = "cls"
JSON_LABEL_PREFIX = "json:"  # label_field "json:label" reads the key "label" of the sample's .json
# timm names ImageNet's validation split "validation"
SPLIT_ALIASES = {"val": ("val", "validation"), "train": ("train",)}


# ---------------------------------------------------------------- shard lists


@dataclass(frozen=True)
class ShardEntry:
    name: str  # the shard's file name (URLs given by the user are matched against it)
    url: str  # where the list says the shard is, resolved against the list's own location
    samples: int


@dataclass(frozen=True)
class ShardList:
    """What a shard list says about the shards of one split."""

    location: str
    kind: str  # "deepres", "wids" or "timm"
    entries: tuple[ShardEntry, ...]
    classes: tuple[str, ...] | None  # None: the list does not name them (pass data.num_classes)
    fields: dict[str, Any]  # the sample fields the list was made with ({} if it does not say)


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith(("pipe:", "file:"))


def _join(base: str, name: str) -> str:
    """`name` relative to the folder of the list at `base` (a path or a URL); absolute names stay."""
    if "://" in name or name.startswith(("pipe:", "/")):
        return name
    if is_local(base):
        return os.path.join(os.path.dirname(base), name)
    if base.startswith("pipe:"):  # the shard is named inside a command; the user passes its URLs
        return name
    return posixpath.join(posixpath.dirname(base), name)


def _load_json(location: str) -> Any:
    from webdataset.gopen import gopen

    try:
        with gopen(location, "rb") as stream:
            return json.loads(stream.read())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read the shard list {location!r} ({exc}). Point the index option at an {INDEX_NAME} "
            f"(`deepres shard --index SHARDS` writes one for any webdataset shards), a wids shard list, "
            f"or a timm {TIMM_INFO_NAME}."
        ) from exc


def _timm_split(info: dict, split: str, location: str) -> dict:
    splits = info.get("splits") or {}
    for name in SPLIT_ALIASES.get(split, (split,)):
        if name in splits:
            return splits[name]
    raise ConfigError(f"{location} describes the splits {', '.join(splits) or 'none'}, not {split!r}.")


def parse_shard_list(obj: Any, location: str, split: str) -> ShardList:
    """A deepres index, a wids shard list or a timm info file, as one ShardList."""
    if not isinstance(obj, dict):
        obj = {}
    if obj.get("format") == FORMAT_NAME:
        if obj.get("version") != FORMAT_VERSION:
            raise ConfigError(f"{location} is a deepres shard index of version {obj.get('version')!r}, not "
                              f"{FORMAT_VERSION}. Rewrite it with this version of `deepres shard`.")
        entries = [ShardEntry(posixpath.basename(e["name"]), _join(location, e["name"]), int(e["samples"]))
                   for e in obj["shards"]]
        return ShardList(location, "deepres", tuple(entries), tuple(obj["classes"]), obj.get("fields") or {})
    if isinstance(obj.get("shardlist"), list):  # wids: webdataset's indexed-dataset description
        entries = [ShardEntry(posixpath.basename(e["url"]), _join(location, e["url"]), int(e["nsamples"]))
                   for e in obj["shardlist"]]
        classes = obj.get("classes")
        return ShardList(location, "wids", tuple(entries), tuple(classes) if classes else None, {})
    if isinstance(obj.get("splits"), dict):  # timm: per-split file names and shard lengths
        info = _timm_split(obj, split, location)
        names, lengths = info.get("filenames") or [], info.get("shard_lengths") or []
        if len(names) != len(lengths):
            raise ConfigError(f"{location}: split {split!r} lists {len(names)} filenames but "
                              f"{len(lengths)} shard_lengths; they must pair up.")
        entries = [ShardEntry(posixpath.basename(n), _join(location, n), int(c)) for n, c in zip(names, lengths, strict=True)]
        classes = obj.get("classes")
        if not classes and obj.get("num_classes"):
            classes = [str(i) for i in range(int(obj["num_classes"]))]
        return ShardList(location, "timm", tuple(entries), tuple(classes) if classes else None, {})
    raise ConfigError(
        f"{location} is not a shard list deepres knows: expected a deepres {INDEX_NAME} (`format: "
        f"{FORMAT_NAME}`), a wids shard list (`shardlist` with `nsamples`) or a timm {TIMM_INFO_NAME} "
        "(`splits` with `shard_lengths`). Run `deepres shard --index SHARDS` to write an index."
    )


def read_shard_list(location: str, split: str = "train") -> ShardList:
    return parse_shard_list(_load_json(location), location, split)


def read_index(location: str) -> dict[str, Any]:
    """Load a deepres index.json from a local path or any URL webdataset can open."""
    index = _load_json(location)
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise ConfigError(
            f"{location} is not a deepres shard index of version {FORMAT_VERSION}. Rewrite the shards with "
            "this version of `deepres shard`, or index them with `deepres shard --index SHARDS`."
        )
    return index


# ---------------------------------------------------------------- reading tar shards


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

    Why not webdataset's reader (tarfile underneath): reading a 2000-sample shard of 110 kB members
    from the page cache took 40 µs per sample against 180 µs with webdataset's `tar_file_iterator`
    + `group_by_keys` (2-core AMD EPYC, Python 3.11, webdataset 1.0.2). End to end, the shard loader
    spends 1.11× less CPU per image and delivers 1.09× the images/s with this reader (median of 5
    trials, same machine: `python scripts/benchmarks/bench_shards.py --trials 5 --images 3200 --tar-reader both`,
    docs/RESULTS.md). A cut-off archive raises tarfile.ReadError.
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


def iter_tar_webdataset(stream: Any) -> Iterator[tuple[str, bytes]]:
    """The same members through webdataset's own tar reader (kept to measure against iter_tar)."""
    from webdataset.tariterators import tar_file_iterator

    for member in tar_file_iterator(stream):
        yield member["fname"], member["data"]


TAR_READERS = {"deepres": iter_tar, "webdataset": iter_tar_webdataset}

# key = path up to the first dot of the file name, as webdataset's base_plus_ext splits it
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")


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


class ShardStalled(OSError):
    """A streamed shard gave no data for the stall timeout; its command was stopped."""


class _StallWatch:
    """Reads a `pipe:` shard's stream and stops its command when no data comes for `timeout_s` seconds (the read
    in progress then returns), so that a hung object-store client cannot hang the data-loader worker."""

    def __init__(self, pipe: Any, timeout_s: float) -> None:
        self.pipe, self.timeout_s = pipe, timeout_s
        self.last = time.monotonic()
        self.fired = False
        self.done = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="deepres-shard-stall-watch").start()

    def read(self, *args: Any) -> bytes:
        data = self.pipe.read(*args)
        self.last = time.monotonic()
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def _watch(self) -> None:
        while not self.done.wait(min(1.0, self.timeout_s / 4)):
            if time.monotonic() - self.last > self.timeout_s:
                self.fired = True
                # the command's children too: `sh -c '... | ...'` leaves them holding the pipe open
                for pid in [*_descendants(self.pipe.proc.pid), self.pipe.proc.pid]:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                return


def _descendants(pid: int) -> list[int]:
    """The processes below `pid`, from /proc (Linux; elsewhere none are found)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def read_shard(url: str, reader: str = "deepres", stall_timeout_s: float | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard, in order: dicts with `__key__`, `__url__` and one entry per field.

    `url` may be a path or any URL webdataset's gopen opens (`pipe:`, `file:`, http, ...). Errors
    (missing file, truncated tar, failing pipe command) propagate to the caller; a `pipe:` command that gives
    no data for `stall_timeout_s` seconds is stopped and raises ShardStalled.
    """
    from webdataset.gopen import gopen

    stream = gopen(url, "rb")
    watch = _StallWatch(stream, stall_timeout_s) if stall_timeout_s and hasattr(stream, "proc") else None
    finished = False
    try:
        try:
            for sample in group_samples(TAR_READERS[reader](watch or stream)):
                sample["__url__"] = url
                yield sample
        except Exception:
            if watch is None or not watch.fired:
                raise
        if watch is not None and watch.fired:
            raise ShardStalled(f"no data for {stall_timeout_s:g} s (data.shard_timeout_s): abandoned")
        finished = True
    finally:
        if watch is not None:
            watch.done.set()
        if finished:  # a `pipe:` command that failed reports it here, when it is waited for
            stream.close()
        else:  # the reader stopped early or the tar broke: that, not the command's exit status, is the news
            with contextlib.suppress(Exception):
                stream.close()


# ---------------------------------------------------------------- the fields of a sample


@dataclass(frozen=True)
class SampleFields:
    """Which fields of a sample hold the image and the label.

    `label` is a field name (`cls`, `label`, `txt`) or `json:KEY` for a key of the sample's JSON
    sidecar (`json:label`, `json:meta.class_id` for a nested key). A label is a class index, or a
    class name looked up in `classes`.
    """

    image: tuple[str, ...] = IMAGE_FIELDS
    label: str = LABEL_FIELD

    @classmethod
    def of(cls, image: Iterable[str] | None, label: str | None, recorded: dict[str, Any] | None = None) -> SampleFields:
        """The fields given, else those a shard list recorded, else the defaults."""
        recorded = recorded or {}
        image = list(image) if image else list(recorded.get("image") or IMAGE_FIELDS)
        label = label or recorded.get("label") or LABEL_FIELD
        bad = [f for f in image if not f or f.startswith(".") or "/" in f]
        if bad:
            raise ConfigError(f"data.image_fields={image}: give extensions without the dot, e.g. [jpg, png].")
        if label.startswith(JSON_LABEL_PREFIX) and not label[len(JSON_LABEL_PREFIX):]:
            raise ConfigError(f"data.label_field={label!r}: name the JSON key, e.g. json:label.")
        return cls(tuple(f.lower() for f in image), label)

    def as_dict(self) -> dict[str, Any]:
        return {"image": list(self.image), "label": self.label}

    def image_bytes(self, sample: dict[str, Any]) -> bytes:
        for name in self.image:
            if name in sample:
                return sample[name]
        present = ", ".join(k for k in sample if not k.startswith("__")) or "none"
        raise ValueError(f"no image field ({'/'.join(self.image)}) in sample {sample.get('__key__')!r} "
                         f"(its fields: {present}; set data.image_fields)")

    def raw_label(self, sample: dict[str, Any]) -> int | str:
        """The label as stored: an int when it reads as one, else the class name."""
        if self.label.startswith(JSON_LABEL_PREFIX):
            if "json" not in sample:
                raise ValueError(f"no json field in sample {sample.get('__key__')!r} for label {self.label!r}")
            value: Any = json.loads(sample["json"])
            for part in self.label[len(JSON_LABEL_PREFIX):].split("."):
                if not isinstance(value, dict) or part not in value:
                    raise ValueError(f"no key {self.label[len(JSON_LABEL_PREFIX):]!r} in the json of sample "
                                     f"{sample.get('__key__')!r}")
                value = value[part]
        elif self.label in sample:
            value = sample[self.label]
        else:
            present = ", ".join(k for k in sample if not k.startswith("__")) or "none"
            raise ValueError(f"no {self.label} field in sample {sample.get('__key__')!r} (its fields: {present}; "
                             "set data.label_field)")
        if isinstance(value, bytes):
            value = value.decode("utf-8").strip()
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"label {value!r} of sample {sample.get('__key__')!r} is neither a class index nor a name")
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value)
        return value

    def label_index(self, sample: dict[str, Any], num_classes: int, class_index: dict[str, int] | None = None) -> int:
        label = self.raw_label(sample)
        if isinstance(label, str):
            if class_index is None or label not in class_index:
                raise ValueError(f"label {label!r} of sample {sample.get('__key__')!r} is not a known class")
            return class_index[label]
        if not 0 <= label < num_classes:
            raise ValueError(f"label {label} of sample {sample.get('__key__')!r} is outside [0, {num_classes})")
        return label


DEFAULT_FIELDS = SampleFields()


def sample_image(sample: dict[str, Any]) -> bytes:
    return DEFAULT_FIELDS.image_bytes(sample)


def sample_label(sample: dict[str, Any], num_classes: int) -> int:
    return DEFAULT_FIELDS.label_index(sample, num_classes)


# ---------------------------------------------------------------- decoding and errors


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


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
