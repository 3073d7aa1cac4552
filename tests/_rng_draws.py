"""A callback that draws from every global random generator before each training step and writes the draws
down, for the resume tests: a resumed run must draw what the uninterrupted run drew.

    deepres fit ... --trainer.callbacks+=_rng_draws.RecordDraws --trainer.callbacks.path=draws.jsonl
"""

from __future__ import annotations

import json
import random

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RecordDraws(Callback):
    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        draws = {"step": trainer.global_step, "python": random.random(), "numpy": float(np.random.rand()),
                 "torch": torch.rand(1).item()}
        with open(self.path, "a") as f:
            f.write(json.dumps(draws) + "\n")
