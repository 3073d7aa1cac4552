"""Indexing shards that another tool wrote (`deepres shard --index`) and verifying shards against their
index (`deepres shard --verify`).

The index is the deepres `index.json` the loader reads (deepres.data.shard_format): for each shard
its sample count, size and sha256, plus the classes the labels name and the fields that hold image
and label. Indexing reads every shard once, in parallel, and resumes after an interruption without
re-reading the shards it already counted.
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepres.data.shard_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    SampleFields,
    decode_rgb,
    describe_error,
    is_local,
    read_index,
    read_shard,
    sha256_file,
)
from deepres.data.shard_jobs import completed, log_progress, read_progress, write_json
from deepres.errors import ConfigError

INDEX_PROGRESS_SUFFIX = ".progress.jsonl"  # beside the index that `--index` is writing


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
    # an interrupted run: keep what it counted for shards that did not change
    done: dict[str, IndexRecord] = read_progress(progress, IndexRecord)
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
            for rec in completed(scan_shard, tasks, pool):
                done[rec.name] = rec
                log_progress(log, rec)
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
    write_json(out, index)
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
    if sha256_file(path) != entry["sha256"]:
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
