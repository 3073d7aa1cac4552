"""Finding the source images that `deepres shard` converts: an ImageNet tree, class folders, CIFAR.

    find_splits(Path("~/data/imagenet"), "auto", None, None)   # [SplitSource(train), SplitSource(val)]

Each split is a sorted class list and one `SourceItem` per image (a file, or a row of a CIFAR pickle
batch), with a unique, dot-free sample key. Nothing here writes anything.
"""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepres.errors import ConfigError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


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
