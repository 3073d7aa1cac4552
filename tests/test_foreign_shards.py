"""Shards that deepres did not write: webdataset's ShardWriter output, wids shard lists, timm _info.json."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import procs
import pytest
import torch
import webdataset as wds
from PIL import Image

from deepres.data import shard_format, shard_index
from deepres.data import shard_writer as sw
from deepres.data.shards import ShardDataModule
from deepres.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _image_bytes(rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    w, h = int(rng.integers(36, 60)), int(rng.integers(36, 60))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out, fmt)
    return out.getvalue()


def write_with_shardwriter(folder: Path, prefix: str, n: int, per_shard: int, num_classes: int, seed: int = 0,
                           sample=None) -> list[int]:
    """n samples written by webdataset's own ShardWriter (`jpg` + `cls`, no deepres index); their labels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = [i % num_classes for i in range(n)]
    with wds.ShardWriter(str(folder / f"{prefix}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, label in enumerate(labels):
            sink.write(sample(i, label, rng) if sample else
                       {"__key__": f"{prefix}{i:05d}", "jpg": _image_bytes(rng), "cls": label})
    return labels


def _index(*args: str | Path) -> int:
    return sw.main(["--index", *map(str, args)])


@pytest.fixture(scope="module")
def writer_shards(tmp_path_factory) -> Path:
    """200 train samples in 4 ShardWriter shards of 50 (5 classes), 30 val samples in 2 shards."""
    root = tmp_path_factory.mktemp("wds")
    write_with_shardwriter(root / "train", "train", 200, 50, 5)
    write_with_shardwriter(root / "val", "val", 30, 16, 5, seed=1)
    return root


def test_data_module_without_an_index_says_how_to_make_one(writer_shards: Path) -> None:
    with pytest.raises(ConfigError, match=r"holds 4 \.tar shards but no index.*deepres shard --index"):
        ShardDataModule(root=str(writer_shards)).setup("fit")


def test_index_tool_counts_samples_classes_and_checksums(writer_shards: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "train.json"
    assert _index(writer_shards / "train", "--out", out, "--workers", "2") == 0
    index = json.loads(out.read_text())
    assert [s["samples"] for s in index["shards"]] == [50] * 4
    assert index["num_samples"] == 200 and index["classes"] == ["0", "1", "2", "3", "4"]
    assert index["indexed"]["samples_per_class"] == {str(c): 40 for c in range(5)}
    first = writer_shards / "train" / "train-000000.tar"
    assert index["shards"][0]["sha256"] == shard_format.sha256_file(first)
    assert index["shards"][0]["name"] == os.path.relpath(first, tmp_path)
    assert "200 samples, 5 classes" in capsys.readouterr().out
    # the index it wrote is one --verify accepts
    assert sw.main(["--verify", str(out), "--workers", "1"]) == 0


def test_index_tool_resumes_without_rereading_finished_shards(writer_shards: Path, tmp_path: Path,
                                                              monkeypatch) -> None:
    out = tmp_path / "index.json"
    real, scanned = shard_index.scan_shard, []

    def interrupted(task):
        if task.name.endswith("000002.tar"):
            raise KeyboardInterrupt
        scanned.append(task.name)
        return real(task)

    monkeypatch.setattr(shard_index, "scan_shard", interrupted)
    assert _index(writer_shards / "train", "--out", out, "--workers", "1") == 130
    assert not out.exists() and len(scanned) == 2

    def counted(task):
        scanned.append(task.name)
        return real(task)

    monkeypatch.setattr(shard_index, "scan_shard", counted)
    assert _index(writer_shards / "train", "--out", out, "--workers", "1") == 0
    assert [Path(n).name for n in scanned[2:]] == ["train-000002.tar", "train-000003.tar"]
    assert json.loads(out.read_text())["num_samples"] == 200
    assert not list(tmp_path.glob("*.progress.jsonl"))


def test_trains_from_shardwriter_shards_after_indexing(writer_shards: Path, tmp_path: Path) -> None:
    root = tmp_path / "shards"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        for tar in (writer_shards / split).glob("*.tar"):
            (root / split / tar.name).symlink_to(tar)
        assert _index(root / split, "--workers", "1") == 0
    dm = ShardDataModule(root=str(root), batch_size=16, num_workers=0, image_size=16, eval_resize=16)
    dm.setup("fit")
    assert dm.num_classes == 5
    assert [len(y) for _, y in dm.train_dataloader()] == [16] * (200 // 16)
    val = torch.cat([y for _, y in dm.val_dataloader()])
    assert sorted(val.tolist()) == sorted(i % 5 for i in range(30))


def test_json_label_names_and_png_images(tmp_path: Path) -> None:
    names = ["cat", "dog", "emu"]

    def sample(i, label, rng):
        return {"__key__": f"s{i:04d}", "png": _image_bytes(rng, "PNG"),
                "json": json.dumps({"meta": {"species": names[label]}, "width": 1}).encode()}

    write_with_shardwriter(tmp_path / "train", "part", 24, 10, 3, sample=sample)
    assert _index(f"{tmp_path}/train/part-{{000000..000002}}.tar", "--label-field", "json:meta.species",
                  "--image-fields", "png", "--workers", "1") == 0
    index = json.loads((tmp_path / "train" / "index.json").read_text())
    assert index["classes"] == names and index["fields"] == {"image": ["png"], "label": "json:meta.species"}
    # the loader takes the fields the index recorded
    index_path = str(tmp_path / "train" / "index.json")
    dm = ShardDataModule(root=str(tmp_path), val_index=index_path, batch_size=4, num_workers=0, image_size=16)
    dm.setup("fit")
    assert len(list(dm.train_dataloader())) == 6
    ys = torch.cat([y for _, y in dm.val_dataloader()])  # validation reads every sample once
    assert dm.corrupt_samples == 0
    assert torch.bincount(ys).tolist() == [8, 8, 8]  # "cat" -> 0, "dog" -> 1, "emu" -> 2
    # a field that the samples lack is named in the message
    assert _index(tmp_path / "train", "--out", tmp_path / "x.json", "--workers", "1") == 2


def test_wids_shard_list(writer_shards: Path, tmp_path: Path) -> None:
    shards = sorted((writer_shards / "train").glob("*.tar"))
    listing = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "train",
               "shardlist": [{"url": os.path.relpath(p, tmp_path), "nsamples": 50, "filesize": p.stat().st_size}
                             for p in shards]}
    (tmp_path / "train.json").write_text(json.dumps(listing))
    with pytest.raises(ConfigError, match="does not name the classes: set data.num_classes"):
        ShardDataModule(train_index=str(tmp_path / "train.json")).setup("fit")
    dm = ShardDataModule(train_index=str(tmp_path / "train.json"), val_index=str(tmp_path / "train.json"),
                         num_classes=5, batch_size=20, num_workers=2, image_size=16)
    dm.setup("fit")
    assert dm.num_classes == 5
    assert [len(y) for _, y in dm.train_dataloader()] == [20] * 10
    ys = torch.cat([y for _, y in dm.val_dataloader()])
    assert len(ys) == 200 and torch.bincount(ys).tolist() == [40] * 5


def test_timm_info_json_at_the_root(writer_shards: Path, tmp_path: Path) -> None:
    splits = {}
    for split, name in (("train", "train"), ("val", "validation")):
        files = sorted((writer_shards / split).glob("*.tar"))
        counts = [sum(1 for _ in wds.WebDataset(str(f), shardshuffle=False)) for f in files]
        splits[name] = {"name": name, "num_samples": sum(counts), "shard_lengths": counts,
                        "filenames": [os.path.relpath(f, tmp_path) for f in files]}
    (tmp_path / "_info.json").write_text(json.dumps({"name": "test", "num_classes": 5, "splits": splits}))
    dm = ShardDataModule(root=str(tmp_path), batch_size=10, num_workers=0, image_size=16, eval_resize=16)
    dm.setup("fit")
    assert dm.num_classes == 5
    assert sum(1 for _ in dm.train_dataloader()) == 20
    assert len(torch.cat([y for _, y in dm.val_dataloader()])) == 30


def test_bad_fields_and_lists_get_clear_messages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="without the dot"):
        ShardDataModule(root=str(tmp_path), image_fields=[".jpg"])
    with pytest.raises(ConfigError, match="name the JSON key"):
        ShardDataModule(root=str(tmp_path), label_field="json:")
    (tmp_path / "list.json").write_text(json.dumps({"files": []}))
    with pytest.raises(ConfigError, match="not a shard list deepres knows.*deepres shard --index"):
        ShardDataModule(train_index=str(tmp_path / "list.json")).setup("fit")


# ---------------------------------------------------------------- real DDP (gloo) from foreign shards


@pytest.fixture(scope="module")
def ddp_writer_shards(tmp_path_factory) -> tuple[Path, list[int]]:
    """90 train samples in ShardWriter shards of 40, 40, 10; 31 val samples, labels 0..30 (one per class)."""
    root = tmp_path_factory.mktemp("ddpwds")
    write_with_shardwriter(root / "train", "train", 90, 40, 31)
    val = write_with_shardwriter(root / "val", "val", 31, 12, 31, seed=1)
    return root, val


def _ddp(kwargs: dict, tmp_path: Path) -> list[dict]:
    script = REPO / "tests" / "_ddp_shards_fit.py"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [json.dumps(kwargs), str(tmp_path), json.dumps({"use_distributed_sampler": False})]
    proc = procs.run([sys.executable, str(script), *args], 300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


STEPS = 90 // (8 * 2)  # samples // (batch_size * ranks), the same on both ranks


def _indexed_by_deepres(root: Path, tmp_path: Path) -> dict:
    """ShardDataModule arguments after `deepres shard --index` wrote each split's index beside its shards."""
    for split in ("train", "val"):
        assert _index(root / split, "--workers", "1", "--num-classes", "31") == 0
    return {"root": str(root)}


def _listed_by_wids(root: Path, tmp_path: Path) -> dict:
    """ShardDataModule arguments naming a wids shard list (urls and sample counts) for each split."""
    for split in ("train", "val"):
        files = sorted((root / split).glob("*.tar"))
        entries = [{"url": str(f), "nsamples": sum(1 for _ in wds.WebDataset(str(f), shardshuffle=False))}
                   for f in files]
        (tmp_path / f"{split}.json").write_text(json.dumps({"wids_version": 1, "shardlist": entries}))
    return {"train_index": str(tmp_path / "train.json"), "val_index": str(tmp_path / "val.json"),
            "num_classes": 31}


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(400)
@pytest.mark.parametrize("shard_arguments", [_indexed_by_deepres, _listed_by_wids],
                         ids=["indexed_shardwriter_shards", "wids_shard_list"])
def test_two_gloo_ranks_train_equal_steps_and_validate_exactly(ddp_writer_shards, tmp_path: Path,
                                                               shard_arguments) -> None:
    root, val_labels = ddp_writer_shards
    ranks = _ddp(shard_arguments(root, tmp_path), tmp_path)
    assert [r["backend"] for r in ranks] == ["gloo"] * 2
    assert [r["steps"] for r in ranks] == [2 * STEPS] * 2
    assert [r["global_step"] for r in ranks] == [2 * STEPS] * 2
    # 31 samples over 2 ranks (16 + 15): each validation epoch sees every sample exactly once
    assert sorted(ranks[0]["val"] + ranks[1]["val"]) == sorted(val_labels * 2)
