"""Synthetic images of any size: for smoke tests and speed measurements, no I/O at all."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from deepres.data.base import DeepresDataModule


class RandomImages(Dataset):
    """Sample i is a fixed function of (seed, i): the same on every rank and every epoch."""

    def __init__(self, length: int, shape: tuple[int, ...], num_classes: int, seed: int):
        self.length, self.shape, self.num_classes, self.seed = length, shape, num_classes, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(self.shape, generator=g), int(torch.randint(self.num_classes, (), generator=g))


class SyntheticDataModule(DeepresDataModule):
    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        num_classes: int = 10,
        train_size: int = 1024,
        val_size: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            image_size: height = width of the images (224 for ImageNet-sized steps).
            channels: image channels.
            num_classes: label range.
            train_size: samples per training epoch.
            val_size: validation samples.
        """
        super().__init__(batch_size, num_workers, seed)
        self.num_classes = num_classes
        self.input_shape = (channels, image_size, image_size)
        self.train_size, self.val_size = train_size, val_size

    def setup(self, stage: str | None = None) -> None:
        self.train_set = RandomImages(self.train_size, self.input_shape, self.num_classes, self.seed)
        self.val_set = RandomImages(self.val_size, self.input_shape, self.num_classes, self.seed + 1)
