"""Writing files so that a crash never leaves a partial one.

Lowest layer of the package (standard library only), so that the run directory, the wandb run-id
file, checkpoints, the shards and their indexes all use the same writer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


def temporary_path(path: Path) -> Path:
    """Where `path` is written before it is renamed into place: hidden, beside it, named after this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_open(path: Path, install: Callable[[Path, Path], None] = os.replace) -> Iterator[BinaryIO]:
    """A binary file to write `path` through: written to `temporary_path(path)`, fsynced, then renamed over
    `path` (by `install`, os.replace unless given) when the block ends without an error. A crash at any
    point leaves either the old file or the new one, never a partial one; an error removes the temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        install(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through `atomic_open`."""
    with atomic_open(path) as f:
        f.write(data)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable: on POSIX file systems the new directory entry
    survives a power loss only once the directory itself is fsynced."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
