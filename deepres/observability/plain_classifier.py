"""The least LightningModule around a classifier, for measuring the diagnostics on their own.

It holds the network as `self.net`, where DeepresModule holds it and the diagnostics look for it, and
does nothing else a step could be charged for: cross-entropy, `train/loss` logged, plain SGD."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


class PlainClassifier(L.LightningModule):
    def __init__(self, net: nn.Module, lr: float, momentum: float = 0.0):
        super().__init__()
        self.net, self.lr, self.momentum = net, lr, momentum

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
