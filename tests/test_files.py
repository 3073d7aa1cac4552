"""deepres.files: the one atomic writer (run directory, wandb run id, checkpoints, shards, indexes)."""

from __future__ import annotations

import os

import pytest

from deepres.files import atomic_open, atomic_write_bytes, temporary_path


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "index.json"
    atomic_write_bytes(path, b"old")  # creates the folder
    with pytest.raises(RuntimeError, match="encoder failed"), atomic_open(path) as f:
        f.write(b"half of the new")
        assert temporary_path(path).exists() and path.read_bytes() == b"old"
        raise RuntimeError("encoder failed")
    assert path.read_bytes() == b"old"
    assert os.listdir(path.parent) == ["index.json"]


def test_the_file_appears_complete_and_install_decides_how(tmp_path):
    path = tmp_path / "last.ckpt"
    installed = []

    def keep_previous(tmp, final):
        if final.exists():
            os.replace(final, final.with_name("previous.ckpt"))
        installed.append(tmp.name)
        os.replace(tmp, final)

    for data in (b"first", b"second"):
        with atomic_open(path, install=keep_previous) as f:
            f.write(data)
            assert not path.exists() or path.read_bytes() == b"first"
    assert path.read_bytes() == b"second" and (tmp_path / "previous.ckpt").read_bytes() == b"first"
    assert installed == [f".last.ckpt.tmp-{os.getpid()}"] * 2
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt", "previous.ckpt"]
