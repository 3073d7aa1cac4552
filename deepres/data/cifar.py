"""CIFAR-10/100 from a local copy of the standard python-pickle archive (no download at run time).

Augmentation of He et al. 2015: 4-pixel zero padding, random 32x32 crop, horizontal flip;
per-channel normalisation with the usual CIFAR statistics.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from deepres.data.base import DeepresDataModule
from deepres.data.recipes import AutoAugmentName, BatchMix, apply_seeded
from deepres.data.recipes import auto_augment as auto_augment_policy
from deepres.errors import ConfigError

ARCHIVES = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10,
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100,
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"),
}
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)


def find_archive(data_dir: str | Path, dataset: str) -> Path:
    """DIR itself or DIR/<archive folder>, whichever holds the batch files."""
    folder, train_files, _, _, _, url = ARCHIVES[dataset]
    data_dir = Path(data_dir).expanduser()
    for candidate in (data_dir, data_dir / folder):
        if all((candidate / f).is_file() for f in train_files):
            return candidate
    raise ConfigError(
        f"{dataset}: no python-pickle archive under {data_dir} (looked for {folder}/{train_files[0]}). "
        f"Download {url} on a machine with internet, then `tar xzf {url.rsplit('/', 1)[1]} -C {data_dir}` "
        f"so that {data_dir / folder / train_files[0]} exists, and pass --data.data_dir {data_dir}."
    )


def load_batches(folder: Path, files: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in files:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


class CIFARImages(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool, policy: Callable | None = None):
        self.images = torch.from_numpy(images)  # (N, 3, 32, 32) uint8
        self.labels = torch.from_numpy(labels)
        self.augment = augment
        self.policy = policy if augment else None  # RandAugment / TrivialAugmentWide on the uint8 image

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def draws_per_sample(self) -> bool:
        """The training sampler gives (index, seed) pairs: each image's augmentation draws from a seed of its
        own (its place in the epoch), so they are the same in a resumed epoch and with any number of workers."""
        return self.augment

    def __getitem__(self, key: int | tuple[int, int]):
        i, seed = key if isinstance(key, tuple) else (key, None)
        g = None if seed is None else torch.Generator().manual_seed(seed)
        x = self.images[i] if self.policy is None else self._policy(self.images[i], g)
        x = (x.float() / 255 - MEAN) / STD
        if self.augment:
            dy, dx = (int(v) for v in torch.randint(0, 9, (2,), generator=g))
            x = torch.nn.functional.pad(x, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(2)
        return x, self.labels[i]

    def _policy(self, image: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        assert self.policy is not None
        if g is None:
            return self.policy(image)
        return apply_seeded(self.policy, image, int(torch.randint(0, 2**62, (), generator=g)))


class CIFARDataModule(DeepresDataModule):
    def __init__(
        self,
        data_dir: str = "data/cifar",
        dataset: Literal["cifar10", "cifar100"] = "cifar10",
        batch_size: int = 128,
        augment: bool = True,
        num_workers: int = 2,
        seed: int = 0,
        worker_start_method: Literal["forkserver", "spawn", "fork"] = "forkserver",
        auto_augment: AutoAugmentName = "none",
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ):
        """
        Args:
            data_dir: folder holding the extracted archive (cifar-10-batches-py/ or cifar-100-python/).
            dataset: "cifar10" or "cifar100".
            batch_size: samples per step and device (He et al. 2015: 128 in total).
            augment: 4-pixel pad + random crop + horizontal flip on the training set.
            num_workers: data-loader worker processes.
            worker_start_method: how they start (`forkserver` is safe in DDP ranks; see data.base).
            auto_augment: none | randaugment (2 ops, magnitude 9) | trivialaugment, per training image
                before the pad and crop (deepres.data.recipes).
            mixup_alpha: MixUp's Beta(α, α) on training batches, on the device (0 = off; Zhang et al.
                2018 use 1.0 on CIFAR-10).
            cutmix_alpha: CutMix's Beta(α, α) (0 = off; Yun et al. 2019: 1.0). Both on: one per batch.
        """
        super().__init__(batch_size, num_workers, seed, worker_start_method)
        if dataset not in ARCHIVES:
            raise ConfigError(f"unknown CIFAR dataset {dataset!r}; valid: {', '.join(ARCHIVES)}.")
        self.data_dir, self.dataset, self.augment = data_dir, dataset, augment
        self.num_classes = ARCHIVES[dataset][4]
        self.policy = auto_augment_policy(auto_augment)
        self.batch_mix = BatchMix(self.num_classes, mixup_alpha, cutmix_alpha)
        self.input_shape = (3, 32, 32)
        find_archive(data_dir, dataset)  # fail at configuration time, before any process starts

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        _, train_files, test_files, label_key, _, _ = ARCHIVES[self.dataset]
        folder = find_archive(self.data_dir, self.dataset)
        self.train_set = CIFARImages(*load_batches(folder, train_files, label_key), self.augment, self.policy)
        self.val_set = CIFARImages(*load_batches(folder, test_files, label_key), False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.mix_batch(*batch)  # MixUp/CutMix of training batches, on the device
