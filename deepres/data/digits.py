"""scikit-learn's handwritten digits: 1,797 real 8x8 images shipped inside scikit-learn (no download).

A fixed stratified split (seed 0): 1,437 training and 360 validation images. `layout="flat"` gives
64-vectors for MLPs, `layout="image"` gives 1x8x8 images for CNNs. Pixels are scaled from 0..16 to
zero mean, unit variance with the training set's statistics.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import TensorDataset

from deepres.data.base import DeepresDataModule


class DigitsDataModule(DeepresDataModule):
    def __init__(
        self,
        batch_size: int = 64,
        layout: Literal["flat", "image"] = "flat",
        val_fraction: float = 0.2,
        num_workers: int = 0,
        seed: int = 0,
    ):
        """
        Args:
            batch_size: samples per step and device.
            layout: "flat" (64 features) or "image" (1x8x8).
            val_fraction: held-out share of the 1,797 images (stratified, fixed split).
            num_workers: data-loader worker processes (the data set is in memory: 0 is fastest).
            seed: shuffling seed (the split itself is always the same).
        """
        super().__init__(batch_size, num_workers, seed)
        self.layout = layout
        self.val_fraction = val_fraction
        self.num_classes = 10
        self.input_shape = (64,) if layout == "flat" else (1, 8, 8)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_tr, x_va, y_tr, y_va = train_test_split(x, y, test_size=self.val_fraction, random_state=0, stratify=y)
        x_tr, x_va = torch.tensor(x_tr, dtype=torch.float32), torch.tensor(x_va, dtype=torch.float32)
        mean, std = x_tr.mean(), x_tr.std()
        x_tr, x_va = (x_tr - mean) / std, (x_va - mean) / std
        shape = (-1, *self.input_shape)
        self.train_set = TensorDataset(x_tr.reshape(shape), torch.tensor(y_tr))
        self.val_set = TensorDataset(x_va.reshape(shape), torch.tensor(y_va))
