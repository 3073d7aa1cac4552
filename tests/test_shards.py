"""deepres shard (writer, resume, verify) and ShardDataModule (exact steps per rank, exact validation)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import procs
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from deepres.data import image_sources, shard_convert, shard_format
from deepres.data import shard_writer as sw
from deepres.data.shards import (
    ImageTransform,
    ShardDataModule,
    ShardLoader,
    TrainShardStream,
    ValShardStream,
    resolve_shards,
)

# Some tests use 3 data-loader workers on purpose (an odd worker count), more than a small machine has cores.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

REPO = Path(__file__).resolve().parents[1]
CLASSES = [f"n{i:08d}" for i in range(5)]


def _jpeg(path: Path, rng: np.random.Generator, w: int, h: int) -> None:
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=85)


def _image_tree(root: Path, per_class: dict[str, int], classes: list[str], seed: int = 0) -> Path:
    """root/<split>/<class>/<class>_<i>.JPEG with noise images of varied size."""
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _jpeg(root / split / c / f"{c}_{i:04d}.JPEG", rng, 40 + (i * 7) % 30, 36 + (i * 5) % 20)
    return root


def _shard(*args: str | Path) -> int:
    return sw.main([str(a) for a in args])


def _read_split(out: Path) -> dict[str, int]:
    """key -> label over all shards of a split, asserting keys are unique."""
    labels: dict[str, int] = {}
    index = json.loads((out / "index.json").read_text())
    for entry in index["shards"]:
        for sample in shard_format.read_shard(str(out / entry["name"])):
            assert sample["__key__"] not in labels
            labels[sample["__key__"]] = shard_format.sample_label(sample, index["num_classes"])
    return labels


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    # 5 classes x 40 train images, 5 x 8 val images
    return _image_tree(tmp_path_factory.mktemp("src"), {"train": 40, "val": 8}, CLASSES)


@pytest.fixture(scope="module")
def shards(source: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert _shard(source, out, "--shard-size", "30", "--workers", "2") == 0
    return out


# ---------------------------------------------------------------- writer


def test_converter_round_trips_labels_and_counts(source: Path, shards: Path) -> None:
    train = json.loads((shards / "train" / "index.json").read_text())
    assert train["classes"] == CLASSES
    assert train["num_samples"] == 200
    assert [s["samples"] for s in train["shards"]] == [30] * 6 + [20]
    labels = _read_split(shards / "train")
    expected = {p.stem: CLASSES.index(p.parent.name) for p in (source / "train").glob("*/*.JPEG")}
    assert labels == expected
    assert _read_split(shards / "val") == {
        p.stem: CLASSES.index(p.parent.name) for p in (source / "val").glob("*/*.JPEG")
    }
    # shuffled across classes: the first shard is not one class
    first = [labels[s["__key__"]] for s in shard_format.read_shard(str(shards / "train" / "train-000000.tar"))]
    assert len(set(first)) == len(CLASSES)


def test_output_is_deterministic_and_independent_of_workers(source: Path, shards: Path, tmp_path: Path) -> None:
    assert _shard(source, tmp_path, "--shard-size", "30", "--workers", "1", "--split", "train") == 0
    assert _digests(tmp_path / "train") == _digests(shards / "train")


def test_resize_and_byte_shard_size(source: Path, tmp_path: Path) -> None:
    assert _shard(source, tmp_path, "--split", "val", "--resize", "24", "--quality", "80",
                  "--shard-size", "20KB", "--workers", "1") == 0
    index = json.loads((tmp_path / "val" / "index.json").read_text())
    assert index["num_samples"] == 40 and len(index["shards"]) > 1
    sizes = [e["bytes"] for e in index["shards"][:-1]]
    assert max(sizes) < 40_000  # about the 20 KB asked for (tar pads to 10 KiB records)
    for sample in shard_format.read_shard(str(tmp_path / "val" / index["shards"][0]["name"])):
        assert min(Image.open(io.BytesIO(sample["jpg"])).size) == 24


def test_corrupt_source_images_are_reported_and_skipped(source: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    shutil.copytree(source / "val", src / "val")
    (src / "val" / CLASSES[0] / "garbage.JPEG").write_bytes(b"this is not a jpeg")
    good = (src / "val" / CLASSES[1] / f"{CLASSES[1]}_0000.JPEG").read_bytes()
    (src / "val" / CLASSES[1] / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    assert _shard(src, tmp_path / "out", "--workers", "2") == 0
    index = json.loads((tmp_path / "out" / "val" / "index.json").read_text())
    assert index["num_samples"] == 40
    assert sorted(Path(s["source"]).name for s in index["skipped"]) == ["garbage.JPEG", "truncated.JPEG"]
    err = capsys.readouterr().err
    assert "skipped val/n00000000/garbage.JPEG" in err and "truncated.JPEG" in err


def test_resume_after_an_interrupted_conversion(source: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(source / "train", src / "train")
    opts = ["--split", "train", "--shard-size", "30", "--workers", "1"]
    # Replace one image of the last shard by a named pipe: the converter blocks reading it, so we know
    # it is inside the last shard when we kill it (workers=1 writes the shards in order).
    split = image_sources.find_splits(src, "imagenet", "train", None)[0]
    plan = shard_convert.plan_split(split, "30", shard_convert.EncodeOptions(None, None), seed=0)
    blocker = src / plan[-1][3].path
    original = blocker.read_bytes()
    blocker.unlink()
    os.mkfifo(blocker)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "deepres", "shard", str(src), str(out), *opts],
                            cwd=REPO, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:  # opening the write end succeeds only once the converter has opened the read end
            try:
                fd = os.open(blocker, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "converter never reached the pipe"
                time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        os.close(fd)
    finally:
        proc.kill()
    train = out / "train"
    kept = {p.name: p.stat() for p in train.glob("*.tar")}
    assert len(kept) == len(plan) - 1 and list(train.glob(".*.tmp-*"))  # the partial last shard
    assert not (train / "index.json").exists()

    blocker.unlink()
    blocker.write_bytes(original)
    assert _shard(src, out, *opts) == 0
    for name, before in kept.items():  # complete shards were kept, not rewritten
        after = (train / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not list(train.glob(".*.tmp-*")) and not list(train.glob(".deepres-shard-*"))
    assert _shard(src, tmp_path / "fresh", *opts) == 0
    assert _digests(train) == _digests(tmp_path / "fresh" / "train")
    assert json.loads((train / "index.json").read_text())["num_samples"] == 200


def test_verify_names_a_truncated_shard(shards: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    assert _shard("--verify", out) == 0
    bad = out / "train" / "train-000002.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    capsys.readouterr()
    assert _shard("--verify", out, "--workers", "2") == 1
    err = capsys.readouterr().err
    assert "train-000002.tar" in err and "train-000001.tar" not in err


def test_flat_imagenet_val_with_devkit_ground_truth(tmp_path: Path) -> None:
    from scipy.io import savemat

    src = _image_tree(tmp_path / "src", {"train": 2}, CLASSES)
    rng = np.random.default_rng(1)
    (src / "val").mkdir()
    truth = [3, 1, 5, 2, 4, 1]  # ILSVRC2012 ids; meta.mat maps id k to CLASSES[5 - k]
    for i in range(1, len(truth) + 1):
        _jpeg(src / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", rng, 40, 40)
    data = src / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(map(str, truth)) + "\n")
    synsets = np.array([(k, CLASSES[5 - k], "words", 0) for k in range(1, 6)],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    savemat(str(data / "meta.mat"), {"synsets": synsets})
    assert _shard(src, tmp_path / "out", "--workers", "1") == 0
    labels = _read_split(tmp_path / "out" / "val")
    assert labels == {f"ILSVRC2012_val_{i:08d}": 5 - k for i, k in enumerate(truth, start=1)}


def test_cifar_archive(tmp_path: Path) -> None:
    import pickle

    rng = np.random.default_rng(2)
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    names = [f"class{i}".encode() for i in range(10)]
    (src / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, 6).tolist()
        batch = {b"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8), b"labels": labels}
        (src / name).write_bytes(pickle.dumps(batch))
    assert _shard(src, tmp_path / "out", "--workers", "1") == 0
    train = tmp_path / "out" / "train"
    index = json.loads((train / "index.json").read_text())
    assert index["num_samples"] == 30 and index["classes"] == [n.decode() for n in names]
    first = pickle.loads((src / "data_batch_1").read_bytes())
    samples = {s["__key__"]: s for e in index["shards"] for s in shard_format.read_shard(str(train / e["name"]))}
    png = Image.open(io.BytesIO(samples["data_batch_1_00002"]["png"]))
    assert np.array_equal(np.asarray(png), first[b"data"][2].reshape(3, 32, 32).transpose(1, 2, 0))
    assert int(samples["data_batch_1_00002"]["cls"]) == first[b"labels"][2]


def test_bad_input_gets_one_clear_message(shards: Path, source: Path, tmp_path: Path, capsys) -> None:
    assert _shard(tmp_path / "nope", tmp_path / "out") == 2
    assert "is not a directory" in capsys.readouterr().err
    out = tmp_path / "out2"
    shutil.copytree(shards, out)
    assert _shard(source, out, "--shard-size", "50", "--workers", "1") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _shard(source, tmp_path / "o", "--shard-size", "lots") == 2
    assert "--shard-size" in capsys.readouterr().err


# ---------------------------------------------------------------- loader


def _loader(stream, rank: int, workers: int) -> ShardLoader:
    n = stream.steps if isinstance(stream, TrainShardStream) else stream.num_batches
    return ShardLoader(stream, n, workers, rank)


def test_the_workers_outlive_ctrl_c_and_sigterm_and_the_pass_ends_complete(shards: Path) -> None:
    """Ctrl-C and a scheduler's SIGTERM reach the loader workers too; they ignore them (the main process
    saves at the end of its step), so the pass goes on to its last batch."""
    import psutil

    train = resolve_shards("train", None, None, str(shards))
    steps = train.num_samples // 8
    stream = TrainShardStream(train, 8, steps, 0, 1, ImageTransform(True, 16, 18, "imagenet"), 50, 0, 16)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    iterator = iter(ShardLoader(stream, steps, 2, 0, worker_start_method="fork"))  # workers: our children
    next(iterator), next(iterator)  # a batch from each worker: both have run their worker_init_fn
    workers = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert len(workers) == 2
    for worker, signum in zip(workers, (signal.SIGINT, signal.SIGTERM), strict=True):
        worker.send_signal(signum)
    time.sleep(1.0)
    assert 2 + sum(1 for _ in iterator) == steps


@pytest.mark.timeout(300)
@pytest.mark.parametrize("world,workers", [(2, 0), (2, 3), (3, 2)])
def test_training_steps_are_equal_on_every_rank_with_uneven_shards(shards: Path, world: int, workers: int) -> None:
    # 7 shards of 30,...,30,20 samples: 7 shards over 2 or 3 ranks (and 6 or 9 reader slots) is uneven
    train = resolve_shards("train", None, None, str(shards))
    steps = train.num_samples // (8 * world)
    transform = ImageTransform(True, 16, 18, "imagenet")
    for rank in range(world):
        stream = TrainShardStream(train, 8, steps, rank, world, transform, 50, 0, 16)
        loader = _loader(stream, rank, workers)
        for _ in range(2):  # two epochs: the same count each time
            shapes = [tuple(x.shape) for x, _ in loader]
            assert shapes == [(8, 3, 16, 16)] * steps
        # resumed 2 batches into epoch 3: only the rest of that epoch
        resumed = ShardLoader(stream, steps, workers, rank, position_fn=lambda: (3, 2))
        assert sum(1 for _ in resumed) == steps - 2


def _break_images(tar_path: Path, which: tuple[int, ...]) -> None:
    """Replace the images at these positions of a shard by bytes that do not decode."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    jpgs = [m.name for m, _ in members if m.name.endswith(".jpg")]
    broken = {jpgs[i]: b"\xff\xd8 not really a jpeg" for i in which}
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            data = broken.get(m.name, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))


def _same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world,workers,buffer", [(1, 0, 50), (1, 2, 50), (2, 3, 1000), (1, 2, 0)])
def test_a_pass_resumed_inside_an_epoch_gives_exactly_the_rest_of_the_uninterrupted_pass(
        shards: Path, tmp_path: Path, world: int, workers: int, buffer: int) -> None:
    """Every worker's stream continues where it stood at the checkpoint: the same images (crops, flips and
    RandAugment's draws), labels and order as the pass in one go, with corrupt samples in the stream."""
    from deepres.data.recipes import auto_augment

    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    _break_images(out / "train" / "train-000001.tar", (2, 11))
    train = resolve_shards("train", None, None, str(out))
    policy = auto_augment("randaugment", 2, 9)
    skipped = 0
    for rank in range(world):
        steps = train.num_samples // (8 * world)

        def epoch_3_from(done: int, state: dict | None = None, rank: int = rank, steps: int = steps
                         ) -> tuple[ShardLoader, list]:
            stream = TrainShardStream(train, 8, steps, rank, world,
                                      ImageTransform(True, 16, 18, "imagenet", policy), buffer, 0, 16)
            loader = ShardLoader(stream, steps, workers, rank, position_fn=lambda: (3, done),
                                 worker_start_method="fork")
            loader.resume_from = state
            return loader, list(loader)

        whole, batches = epoch_3_from(0)
        skipped += whole.skipped["undecodable_image"]
        for done in (1, steps // 2, steps - 1):
            state = whole.stream_state(done)
            assert state["positions"] != [0] * max(workers, 1)
            assert _same_batches(epoch_3_from(done, state)[1], batches[done:]), (rank, done)
        # without the positions (a checkpoint from another worker count): a fresh order for the rest
        _, fresh = epoch_3_from(steps // 2)
        assert len(fresh) == steps - steps // 2 and not _same_batches(fresh, batches[steps // 2:])
    assert skipped >= 2  # the broken images were in the streams (read once per rank that reached them)


def test_the_shuffle_buffer_draws_what_webdatasets_draws() -> None:
    """deepres's buffer keeps its state in the open, and gives the order webdataset's shuffle gives."""
    import random

    from webdataset.filters import shuffle

    from deepres.data.shard_stream import ShuffleBuffer

    theirs = list(shuffle(50, 20, rng=random.Random(7))(iter(range(300))))
    ours = list(ShuffleBuffer(50, 20, random.Random(7))(iter(range(300))))
    assert ours == theirs and sorted(ours) == list(range(300)) and ours != list(range(300))


@pytest.mark.timeout(120)
def test_fewer_shards_than_readers_still_gives_every_rank_its_steps(tmp_path: Path, source: Path) -> None:
    assert _shard(source, tmp_path, "--split", "val", "--shard-size", "1000", "--workers", "1") == 0
    val = resolve_shards("val", None, None, str(tmp_path))
    assert len(val.urls) == 1
    transform = ImageTransform(True, 16, 18, "imagenet")
    for rank in range(4):  # 1 shard, 4 ranks x 2 workers = 8 readers
        stream = TrainShardStream(val, 4, 3, rank, 4, transform, 10, 0, 16)
        assert sum(1 for _ in _loader(stream, rank, 2)) == 3


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_validation_across_two_ranks_counts_every_sample_once(tmp_path: Path, workers: int) -> None:
    # one image per class, so a label identifies a sample; 47 samples in shards of 10,10,10,10,7
    classes = [f"c{i:02d}" for i in range(47)]
    src = _image_tree(tmp_path / "src", {"val": 1}, classes)
    assert _shard(src, tmp_path / "out", "--shard-size", "10", "--workers", "1") == 0
    val = resolve_shards("val", None, None, str(tmp_path / "out"))
    transform = ImageTransform(False, 16, 18, "imagenet")
    seen, batches = [], []
    for rank in range(2):
        loader = _loader(ValShardStream(val, 4, rank, 2, transform, 16), rank, workers)
        labels = [y for _, y in loader]
        batches.append(len(labels))
        seen += torch.cat(labels).tolist()
    assert batches[0] == batches[1] == 6  # ceil(ceil(47 / 2) / 4)
    assert sorted(seen) == list(range(47))


@pytest.mark.timeout(120)
def test_corrupt_sample_inside_a_shard_is_skipped_counted_and_logged(shards: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    bad = out / "val" / "val-000000.tar"
    with tarfile.open(bad) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    jpgs = [m.name for m, _ in members if m.name.endswith(".jpg")]
    broken = {jpgs[3]: b"\xff\xd8 not really a jpeg", jpgs[7]: members[0][1][:100]}
    with tarfile.open(bad, "w") as tar:
        for m, data in members:
            data = broken.get(m.name, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    dm = ShardDataModule(root=str(out), batch_size=8, num_workers=2, image_size=16, eval_resize=18)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="deepres.data.shards"):
        labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert len(labels) == 40 - 2
    assert dm.corrupt_samples == 2 and dm.skipped_samples == {"undecodable_image": 2}
    assert sum("skipped corrupt sample" in r.message for r in caplog.records) == 2
    # training keeps its exact step count with corrupt samples in the stream
    assert [len(y) for _, y in dm.train_dataloader()] == [8] * (200 // 8)


def _with_two_broken_val_images(shards: Path, out: Path) -> Path:
    shutil.copytree(shards, out)
    bad = out / "val" / "val-000000.tar"
    with tarfile.open(bad) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    jpgs = [m.name for m, _ in members if m.name.endswith(".jpg")]
    broken = {jpgs[3]: b"not a jpeg", jpgs[7]: b"\xff\xd8 cut"}
    with tarfile.open(bad, "w") as tar:
        for m, data in members:
            data = broken.get(m.name, data)
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return out


@pytest.mark.timeout(300)
def test_skipped_samples_are_counted_per_reason_in_metrics_finished_json_and_the_last_lines(
        shards: Path, tmp_path: Path, capsys) -> None:
    from deepres.training.cli import main

    root = _with_two_broken_val_images(shards, tmp_path / "shards")
    rc = main(["fit", "--run.root", str(tmp_path / "runs"), "--run.name", "s", "--data", "deepres.data.ShardDataModule",
               "--data.root", str(root), "--data.batch_size", "8", "--data.num_workers", "0",
               "--data.image_size", "16", "--data.eval_resize", "16", "--model.arch", "highway_mlp",
               "--model.depth", "2", "--model.width", "8", "--trainer.max_epochs", "2",
               "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
               "--wandb.enabled", "false"])
    assert rc == 0
    run = tmp_path / "runs" / "s"
    with open(run / "metrics.csv", newline="") as f:
        counted = [(r["epoch"], r["data/skipped/undecodable_image"]) for r in csv.DictReader(f)
                   if r.get("data/skipped/undecodable_image")]
    assert counted == [("0", "2.0"), ("1", "4.0")]  # the two broken images, once per validation
    finished = json.loads((run / "finished.json").read_text())["metrics"]
    assert finished["data/skipped/undecodable_image"] == 4.0 and finished["data/skipped/bad_label"] == 0.0
    assert "deepres: skipped 4 corrupt samples (4 undecodable image)" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_a_stalled_pipe_shard_is_abandoned_after_the_timeout_with_one_line(shards: Path, caplog) -> None:
    stalled = f"pipe:sh -c 'sleep 60; cat {shards}/val/val-000000.tar'"
    dm = ShardDataModule(root=str(shards), val_urls=f"{stalled}::{shards}/val/val-000001.tar", batch_size=8,
                         num_workers=0, image_size=16, eval_resize=18, shard_timeout_s=1.0)
    dm.setup("fit")
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="deepres.data.shards"):
        labels = torch.cat([y for _, y in dm.val_dataloader()])
    assert time.monotonic() - started < 20  # not the 60 s the command would take
    assert len(labels) == 10 and dm.skipped_samples == {"stalled_shard": 30}  # the second shard is read
    lines = [r.message for r in caplog.records]
    assert len(lines) == 1 and "no data for 1 s (data.shard_timeout_s): abandoned after 0 of its 30" in lines[0]


def test_truncated_shard_in_validation_keeps_batch_counts(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    shutil.copytree(shards, out)
    bad = out / "val" / "val-000000.tar"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    val = resolve_shards("val", None, None, str(out))
    loader = _loader(ValShardStream(val, 8, 0, 1, ImageTransform(False, 16, 18, "imagenet"), 16), 0, 2)
    labels = [y for _, y in loader]
    assert len(labels) == 5
    assert loader.corrupt_samples > 0 and sum(map(len, labels)) + loader.corrupt_samples == 40


def test_data_module_pipe_urls_and_normalisation(shards: Path) -> None:
    pattern = f"pipe:cat {shards}/train/train-{{000000..000006}}.tar"
    dm = ShardDataModule(train_urls=pattern, train_index=str(shards / "train" / "index.json"),
                         batch_size=10, num_workers=0, image_size=16)
    dm.setup("fit")
    assert dm.num_classes == 5 and dm.input_shape == (3, 16, 16)
    batches = list(dm.train_dataloader())
    assert len(batches) == 20
    x, y = dm.on_after_batch_transfer(batches[0], 0)
    assert x.dtype == torch.float32 and x.shape == (10, 3, 16, 16)
    raw = batches[0][0].float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)


@pytest.mark.timeout(60)
def test_unreadable_shards_fail_fast_instead_of_streaming_forever(shards: Path, tmp_path: Path) -> None:
    from deepres.errors import ConfigError

    dm = ShardDataModule(train_urls=f"pipe:cat {tmp_path}/gone/train-{{000000..000006}}.tar 2>/dev/null",
                         train_index=str(shards / "train" / "index.json"), batch_size=8, num_workers=0)
    with pytest.raises(ConfigError, match="could not be read"):
        next(iter(dm.train_dataloader()))


def test_data_module_messages(shards: Path, tmp_path: Path) -> None:
    from deepres.errors import ConfigError

    with pytest.raises(ConfigError, match="data.root"):
        ShardDataModule()
    with pytest.raises(ConfigError, match="train_index"):
        ShardDataModule(train_urls="pipe:cat x-{0..3}.tar").setup("fit")
    with pytest.raises(ConfigError, match="names no shard"):
        ShardDataModule(train_urls=str(tmp_path / "other-000000.tar"),
                        train_index=str(shards / "train" / "index.json")).setup("fit")
    with pytest.raises(ConfigError, match="do not fill one batch"):
        ShardDataModule(root=str(shards), batch_size=1000).train_dataloader()


class TinyImageClassifier(L.LightningModule):
    """Flatten + linear; records the epoch of every training step."""

    def __init__(self, num_classes: int, side: int = 16) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * side * side, num_classes))
        self.step_epochs: list[int] = []

    def training_step(self, batch, _):
        x, y = batch
        assert x.dtype == torch.float32  # normalised by the data module after the transfer
        self.step_epochs.append(self.current_epoch)
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing="callbacks" in kw,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)


@pytest.mark.timeout(300)
def test_resume_mid_epoch_trains_exactly_what_the_run_in_one_go_trains(shards: Path, tmp_path: Path) -> None:
    """A checkpoint inside an epoch (as every_n_train_steps, a signal or a dead rank's last save writes it)
    resumes with only that epoch's remaining steps, on the batches the run in one go reads next: the final
    weights are bit-identical."""
    def module(side: int = 16) -> ShardDataModule:
        return ShardDataModule(root=str(shards), batch_size=8, num_workers=2, image_size=side, eval_resize=side,
                               worker_start_method="fork")

    torch.manual_seed(0)
    whole = TinyImageClassifier(module().num_classes)
    _trainer(tmp_path / "whole", max_epochs=2, limit_val_batches=0).fit(whole, module())

    dm = module()
    torch.manual_seed(0)
    first = TinyImageClassifier(dm.num_classes)
    # a checkpoint taken during training after 7 of the epoch's 25 steps, as every_n_train_steps does
    save = ModelCheckpoint(dirpath=tmp_path, filename="mid", every_n_train_steps=7, save_top_k=1)
    trainer = _trainer(tmp_path, max_steps=9, limit_val_batches=0, callbacks=[save])
    trainer.fit(first, dm)
    assert first.step_epochs == [0] * 9

    dm = module()
    resumed = TinyImageClassifier(dm.num_classes)
    trainer = _trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    trainer.fit(resumed, dm, ckpt_path=tmp_path / "mid.ckpt")
    steps = 200 // 8
    assert resumed.step_epochs == [0] * (steps - 7) + [1] * steps
    assert trainer.global_step == 2 * steps
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


# ---------------------------------------------------------------- real DDP


@pytest.fixture(scope="module")
def ddp_shards(tmp_path_factory) -> Path:
    """30 classes: 90 train images in shards of 40, 40, 10 (uneven per rank), 30 val images (one per class)."""
    tmp = tmp_path_factory.mktemp("ddp")
    src = _image_tree(tmp / "src", {"train": 3, "val": 1}, [f"c{i:02d}" for i in range(30)])
    assert _shard(src, tmp / "shards", "--shard-size", "40", "--workers", "1") == 0
    return tmp / "shards"


DDP_STEPS_PER_EPOCH = 90 // (8 * 2)  # samples // (batch_size * ranks)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_two_process_ddp_fit_with_uneven_shards_runs_equal_steps(ddp_shards: Path, tmp_path: Path) -> None:
    script = REPO / "tests" / "_ddp_shards_fit.py"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [json.dumps({"root": str(ddp_shards)}), str(tmp_path)]
    proc = procs.run([sys.executable, str(script), *args], 300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["steps"] for r in ranks] == [2 * DDP_STEPS_PER_EPOCH] * 2
    assert [r["global_step"] for r in ranks] == [2 * DDP_STEPS_PER_EPOCH] * 2
    # two validation epochs, each sees every val sample exactly once across the two ranks
    seen = sorted(ranks[0]["val"] + ranks[1]["val"])
    assert seen == sorted(list(range(30)) * 2)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
def test_deepres_fit_from_shards_on_two_processes(ddp_shards: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "deepres", "fit",
           "--data", "deepres.data.shards.ShardDataModule", "--data.root", str(ddp_shards),
           "--data.batch_size", "8", "--data.num_workers", "1", "--data.image_size", "16",
           "--data.eval_resize", "16",
           "--model.arch", "highway_mlp", "--model.depth", "2", "--model.width", "16",
           "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
           "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false",
           "--run.root", str(tmp_path / "runs"), "--run.name", "shards"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = procs.run(cmd, 300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "shards"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 * DDP_STEPS_PER_EPOCH
    lines = (run / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("val/acc1")
    accs = [float(v.split(",")[col]) for v in lines[1:] if v.split(",")[col]]
    assert len(accs) == 2
    for acc in accs:  # exact accuracy over the 30 samples: a whole number of them, none padded
        assert abs(acc * 30 - round(acc * 30)) < 1e-4


class _ParentPid(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return os.getppid()


def test_workers_start_from_a_fork_server_not_from_the_training_process() -> None:
    # fork() of a multi-threaded DDP rank can leave a worker waiting on a lock forever (see data.base)
    from deepres.data.base import worker_context

    loader = torch.utils.data.DataLoader(_ParentPid(), batch_size=None, num_workers=1,
                                         multiprocessing_context=worker_context("forkserver"))
    parents = set(loader)
    assert parents and os.getpid() not in parents
    from deepres.errors import ConfigError

    with pytest.raises(ConfigError, match="worker_start_method='threads'.*forkserver, spawn, fork"):
        ShardDataModule(root="/nonexistent", worker_start_method="threads")
