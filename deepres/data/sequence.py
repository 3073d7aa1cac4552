"""The long-time-lag tasks of Hochreiter & Schmidhuber 1997, generated on the fly (no download).

adding (Experiment 4): pairs (value ∈ [−1, 1], marker ∈ {−1, 0, 1}); exactly two pairs are marked
with 1 — one of the first ten, one of the first T/2 − 1 — the first and last pair carry marker −1
(if the first pair is marked, its value is set to 0, so the target is still the sum of the marked
values). Target at the sequence end: 0.5 + (X1 + X2)/4 ∈ [0, 1]. A
sequence counts as solved when the absolute error is below 0.04.

temporal_order (Experiment 6a): one-hot symbols from {a, b, c, d, X, Y, E, B}; the sequence starts
with E, ends with B, and holds X or Y at t1 ∈ [0.1T, 0.2T] and t2 ∈ [0.5T, 0.6T]; the class is the
order (XX, XY, YX, YY). (The paper uses T = 100…110 with t1 ∈ [10, 20], t2 ∈ [50, 60].)

The other tasks of the paper's Section 5 (multiplication, temporal order with three symbols, the
noise-free and very-long-lag sequences of Exp. 2, the two-sequence problem) are named tasks of
deepres.data.lstm_tasks, selected with `task` and configured with `task_args`.

Deviation: every sequence of a task has exactly T steps (the paper draws lengths in [T, 1.1T]),
so that sequences batch without padding.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.data import Dataset

from deepres.data.base import DeepresDataModule
from deepres.errors import ConfigError

ADDING_TOLERANCE = 0.04  # Hochreiter & Schmidhuber 1997, Sec. 5.4


def adding_sequence(T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.rand(T, generator=g) * 2 - 1
    markers = torch.zeros(T)
    markers[0] = markers[-1] = -1.0
    first = int(torch.randint(0, min(10, T), (), generator=g))
    candidates = [i for i in range(max(T // 2 - 1, 2)) if i != first]
    second = candidates[int(torch.randint(0, len(candidates), (), generator=g))]
    markers[first] = markers[second] = 1.0
    if 0 in (first, second):  # "In the rare case where the first pair of the sequence gets marked, we set X1
        values[0] = 0.0       # to zero": its value, so that the target stays the sum of the marked values
    x1 = float(values[first])
    x2 = float(values[second])
    return torch.stack([values, markers], dim=1), torch.tensor([0.5 + (x1 + x2) / 4.0])


def temporal_order_sequence(T: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    symbols = torch.randint(0, 4, (T,), generator=g)  # a b c d
    symbols[0], symbols[-1] = 6, 7  # E ... B
    t1 = int(torch.randint(int(0.1 * T), int(0.2 * T) + 1, (), generator=g))
    t2 = int(torch.randint(int(0.5 * T), int(0.6 * T) + 1, (), generator=g))
    a, b = (int(v) for v in torch.randint(0, 2, (2,), generator=g))  # 0 = X, 1 = Y
    symbols[t1], symbols[t2] = 4 + a, 4 + b
    return torch.nn.functional.one_hot(symbols, 8).float(), torch.tensor(2 * a + b)


class SequenceTask(Dataset):
    def __init__(self, task: str, seq_len: int, length: int, seed: int, task_args: dict | None = None):
        from deepres.data.lstm_tasks import END_TASKS

        base = {"adding": adding_sequence, "temporal_order": temporal_order_sequence}.get(task)
        self.make = base or functools.partial(END_TASKS[task].make, **(task_args or {}))
        self.seq_len, self.length, self.seed = seq_len, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.make(self.seq_len, torch.Generator().manual_seed(self.seed * 1_000_003 + i))


class SequenceDataModule(DeepresDataModule):
    def __init__(
        self,
        task: str = "adding",
        seq_len: int = 100,
        train_size: int = 20_000,
        val_size: int = 2560,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        task_args: dict | None = None,
    ):
        """
        Args:
            task: "adding" (regression at the sequence end), "temporal_order" (4 classes), or a task of
                deepres.data.lstm_tasks.END_TASKS (multiplication, temporal_order_3, noise_free,
                no_local_regularities, very_long_lag, two_sequence).
            seq_len: T, the time lag to bridge (the paper: 100, 500, 1000).
            train_size: freshly generated sequences per training epoch.
            val_size: held-out sequences (the paper tests on 2,560).
            task_args: the task's own settings, e.g. {"p": 50} for very_long_lag, {"n_info": 3,
                "noisy_inputs": true} for two_sequence.
        """
        from deepres.data.lstm_tasks import END_TASKS

        super().__init__(batch_size, num_workers, seed)
        valid = ("adding", "temporal_order", *END_TASKS)
        if task not in valid:
            raise ConfigError(f"unknown sequence task {task!r}; valid: {', '.join(map(repr, valid))}.")
        if seq_len < 20:
            raise ConfigError(f"seq_len must be >= 20 for the {task} task; got {seq_len}.")
        self.task_args = dict(task_args or {})
        if task in END_TASKS:
            spec = END_TASKS[task]
            unknown = sorted(set(self.task_args) - set(spec.args))
            if unknown:
                raise ConfigError(f"task_args {unknown} do not apply to the {task} task; it takes "
                                  f"{list(spec.args) or 'none'}.")
            self.num_classes = spec.classes(seq_len, self.task_args)
            self.input_shape = (spec.steps(seq_len, self.task_args), spec.features(seq_len, self.task_args))
        else:
            self.num_classes = 0 if task == "adding" else 4  # 0: regression
            self.input_shape = (seq_len, 2 if task == "adding" else 8)
        self.task, self.seq_len = task, seq_len
        self.train_size, self.val_size = train_size, val_size

    def setup(self, stage: str | None = None) -> None:
        self.train_set = SequenceTask(self.task, self.seq_len, self.train_size, self.seed, self.task_args)
        self.val_set = SequenceTask(self.task, self.seq_len, self.val_size, self.seed + 7919, self.task_args)
