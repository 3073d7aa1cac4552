"""Which shards a split reads: the shard URLs, their sample counts and classes, from the options.

`resolve_shards` joins a URL pattern and/or a shard list (deepres.data.shard_format reads the list) into
a `ShardSet`, and says in one line which option to set when neither is found.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

from deepres.data.shard_format import INDEX_NAME, TIMM_INFO_NAME, ShardList, is_local, read_shard_list
from deepres.errors import ConfigError


@dataclass(frozen=True)
class ShardSet:
    """Shard URLs in list order, the number of samples in each, the class names, the recorded fields."""

    urls: tuple[str, ...]
    samples: tuple[int, ...]
    classes: tuple[str, ...]
    fields: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_samples(self) -> int:
        return sum(self.samples)

    def nonempty(self) -> ShardSet:
        keep = [i for i, n in enumerate(self.samples) if n > 0]
        return ShardSet(tuple(self.urls[i] for i in keep), tuple(self.samples[i] for i in keep), self.classes,
                        self.fields)


def _shard_name_in(url: str, names: set[str]) -> str | None:
    # A URL names its shard somewhere in it: a path, s3://b/train-000001.tar, `pipe:aws s3 cp ... -`.
    candidates = [os.path.basename(t) for t in re.findall(r"[\w./-]+\.tar", url)]
    return next((c for c in reversed(candidates) if c in names), None)


def _default_list(split: str, root: str) -> str | None:
    """ROOT/<split>/index.json (deepres), else ROOT/_info.json (timm) when it describes the split."""
    index = os.path.join(root, split, INDEX_NAME)
    if os.path.exists(index):
        return index
    info = os.path.join(root, TIMM_INFO_NAME)
    if os.path.exists(info):
        with contextlib.suppress(ConfigError):
            read_shard_list(info, split)
            return info
    return None


def no_list_message(split: str, root: str) -> str:
    tars = [os.path.join(d, n) for d in (root, os.path.join(root, split)) if os.path.isdir(d)
            for n in sorted(os.listdir(d)) if n.endswith(".tar")]
    found = f" {root} holds {len(tars)} .tar shards but no index for them." if tars else ""
    return (f"no {split} shards found: neither {os.path.join(root, split, INDEX_NAME)} nor a timm "
            f"{os.path.join(root, TIMM_INFO_NAME)} with a {split!r} split exists.{found} Index existing webdataset "
            f"shards with `deepres shard --index {os.path.join(root, split)}` (or pass data.{split}_index with a "
            "wids shard list), or convert images with `deepres shard SRC OUT`.")


def _classes(listed: ShardList, num_classes: int | None, split: str) -> tuple[str, ...]:
    if listed.classes is None:
        if num_classes is None:
            raise ConfigError(f"{listed.location} (a {listed.kind} shard list) does not name the classes: set "
                              "data.num_classes, or index the shards with `deepres shard --index`, which counts them.")
        return tuple(str(i) for i in range(num_classes))
    if num_classes is not None and num_classes != len(listed.classes):
        raise ConfigError(f"data.num_classes={num_classes}, but the {split} shard list {listed.location} names "
                          f"{len(listed.classes)} classes. Leave data.num_classes unset or fix the list.")
    return listed.classes


def resolve_shards(split: str, urls: str | None, index: str | None, root: str | None,
                   num_classes: int | None = None) -> ShardSet | None:
    """The shards of one split from a URL pattern and/or a shard list; None if the split is not configured.

    The list (a deepres index.json, a wids shard list or a timm _info.json) defaults to
    ROOT/<split>/index.json or ROOT/_info.json, or to the index.json beside local shard files; the URLs
    default to the shards the list names, resolved against the list's location.
    """
    from webdataset.shardlists import expand_urls

    expanded = expand_urls(urls) if urls else []
    if index is None and root is not None:
        index = _default_list(split, root)
        if index is None:
            if urls is None:
                return None
            raise ConfigError(no_list_message(split, root))
    if index is None and expanded and is_local(expanded[0]):
        index = os.path.join(os.path.dirname(expanded[0]), INDEX_NAME)
        if not os.path.exists(index):
            raise ConfigError(f"{split}_urls {urls!r} have no {INDEX_NAME} beside them. Index the shards with "
                              f"`deepres shard --index '{urls}'`, or pass {split}_index with their shard list.")
    if index is None:
        if urls is None:
            return None
        raise ConfigError(
            f"{split}_urls {urls!r} are not local files, so the index cannot be found beside them. Pass "
            f"{split}_index with the {INDEX_NAME} that `deepres shard` wrote (a path or a pipe: URL), a wids "
            f"shard list or a timm {TIMM_INFO_NAME}."
        )
    listed = read_shard_list(index, split)
    classes = _classes(listed, num_classes, split)
    if not expanded:
        if index.startswith("pipe:"):  # the shards' own URLs cannot be derived from a command
            raise ConfigError(f"{split}_index {index!r} is remote: pass {split}_urls naming its shards as well.")
        return ShardSet(tuple(e.url for e in listed.entries), tuple(e.samples for e in listed.entries), classes,
                        listed.fields)
    by_name = {e.name: e.samples for e in listed.entries}
    samples = []
    for url in expanded:
        name = _shard_name_in(url, set(by_name))
        if name is None:
            raise ConfigError(
                f"{split} shard URL {url!r} names no shard listed in {index}. Use the shard names "
                "the list holds (e.g. train-000000.tar) or point the index option at their list."
            )
        samples.append(by_name[name])
    missing = [u for u in expanded if is_local(u) and not os.path.exists(u)]
    if missing:
        raise ConfigError(f"{len(missing)} {split} shard files do not exist, e.g. {missing[0]}.")
    return ShardSet(tuple(expanded), tuple(samples), classes, listed.fields)
