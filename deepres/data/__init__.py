"""Data modules. Each exposes `num_classes` (0 = regression) and `input_shape`, which the CLI links
into the model, and splits its data across ranks itself (see deepres.data.base).

Imported lazily: `deepres shard` uses deepres.data.shard_writer without paying for Lightning.
"""

import importlib

_EXPORTS = {
    "DeepresDataModule": "deepres.data.base",
    "CIFARDataModule": "deepres.data.cifar",
    "DigitsDataModule": "deepres.data.digits",
    "SequenceDataModule": "deepres.data.sequence",
    "ShardDataModule": "deepres.data.shards",
    "SyntheticDataModule": "deepres.data.synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'deepres.data' has no attribute {name!r}")
