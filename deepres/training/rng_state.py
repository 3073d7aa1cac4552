"""Every random generator of every rank in the checkpoint, so that a resumed run draws what the uninterrupted
run would have drawn (dropout, drop_path, MixUp/CutMix, a user's own `random` or NumPy calls).

Saved: Python's `random`, NumPy's global generator, torch's CPU generator and, once CUDA is initialised, the
generator of every CUDA device. Each rank keeps its own generators, so the checkpoint holds a list with one
entry per rank (gathered from every rank when the checkpoint is written, which all ranks do together); a
resumed rank restores its own entry. Restored in `on_load_checkpoint`, which Lightning calls before the
strategy is set up and before any loader is iterated; deepres's loaders draw their worker seeds from a
generator of their own (deepres.data.base), so nothing draws from these between the restore and the first
training step.

Stored as lists and tensors, not NumPy arrays, so that the checkpoint still loads with `weights_only=True`. A run
resumed with more processes than wrote the checkpoint leaves the new ranks' generators as seeded.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from deepres.lightning_compat import gather_from_ranks

RNG_KEY = "deepres_rng_states"  # one entry per rank


def collect() -> dict[str, Any]:
    """This process's generator states, in types a weights-only load accepts."""
    version, state, gauss = random.getstate()
    numpy = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": {"bit_generator": numpy["bit_generator"], "key": numpy["state"]["key"].tolist(),
                  "pos": int(numpy["state"]["pos"]), "has_gauss": int(numpy["has_gauss"]),
                  "gauss": float(numpy["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore(states: dict[str, Any]) -> None:
    """Set this process's generators to `states` (from `collect`)."""
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    numpy = states["numpy"]
    np.random.set_state({"bit_generator": numpy["bit_generator"],
                         "state": {"key": np.asarray(numpy["key"], dtype=np.uint32), "pos": numpy["pos"]},
                         "has_gauss": numpy["has_gauss"], "gauss": numpy["gauss"]})
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RandomGenerators(Callback):
    """Saves every rank's generator states in each checkpoint and restores this rank's on resume."""

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[RNG_KEY] = gather_from_ranks(trainer, collect())

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get(RNG_KEY)
        rank = trainer.global_rank
        if isinstance(states, list) and rank < len(states):
            restore(states[rank])
