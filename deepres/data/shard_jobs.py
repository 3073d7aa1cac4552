"""Per-shard jobs that an interrupted run resumes: `deepres shard` converting images and indexing shards.

Each job's result is logged as one JSON line the moment the job finishes; the next run reads the log
back (a last line cut short by the interruption is ignored) and only redoes the jobs that are missing.
The JSON files such runs leave (plans, indexes) are written atomically.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any, TypeVar

from deepres.files import atomic_write_bytes

Task = TypeVar("Task")
Record = TypeVar("Record")


def completed(fn: Callable[[Task], Record], tasks: list[Task], pool: cf.Executor | None) -> Iterator[Record]:
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


def read_progress(path: Path, record: type[Record]) -> dict[str, Record]:
    """The records a progress log holds, by their `name`; none if there is no log."""
    records: dict[str, Any] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = record(**json.loads(line))
            except (ValueError, TypeError):  # a line cut short by the interruption
                continue
            records[rec.name] = rec  # type: ignore[attr-defined]
    return records


def log_progress(log: IO[str], record: Any) -> None:
    """Append one finished job's record (a dataclass) to its progress log, flushed before the next job finishes."""
    log.write(json.dumps(asdict(record)) + "\n")
    log.flush()


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())
