"""An exponential moving average of the weights, evaluated and checkpointed with the run.

    model:
      init_args:
        ema_decay: 0.9999      # Classifier: validate with, and save, the EMA of the weights

After every optimizer step the average moves towards the current weights,
ema <- decay * ema + (1 - decay) * weights (Polyak & Juditsky 1992; the EMA used for EfficientNet,
Tan & Le 2019, and timm's train.py), with torch.optim.swa_utils's EMA update (one fused `lerp` over
all tensors). BatchNorm running statistics are averaged as well (swa_utils' `use_buffers=True`).
Validation runs on the averaged weights (the training weights are put back afterwards). The average
is saved in every checkpoint (`callbacks` state, restored on resume) and, under `ema_state_dict`, as
a plain state dict of the network that `--model.init_from` and `load_state_dict` take.

Under DDP every rank applies the same optimizer step to the same weights, so every rank's average is
the same without communication; only rank 0 writes it. ZeRO stage 3 shards the weights across
ranks and is refused.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from deepres.errors import ConfigError


class WeightEMA(L.Callback):
    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"model.ema_decay={decay}: give a decay in (0, 1), e.g. 0.9999, or leave it unset.")
        self.decay = decay
        self.update = get_ema_multi_avg_fn(decay)
        self.names: list[str] = []
        self.shadow: list[torch.Tensor] | None = None
        self.step = 0  # the global step of the last update (0: none yet)
        self._restored: dict[str, Any] | None = None
        self._backup: list[torch.Tensor] | None = None

    @property
    def state_key(self) -> str:
        return f"WeightEMA[decay={self.decay}]"

    @staticmethod
    def _tensors(net: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
        """Parameters and floating-point buffers (BatchNorm statistics), by name."""
        params = [(n, p) for n, p in net.named_parameters()]
        buffers = [(n, b) for n, b in net.named_buffers() if b.is_floating_point()]
        return params + buffers

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        named = self._tensors(pl_module.net)
        if any(hasattr(p, "ds_id") for _, p in named):  # DeepSpeed ZeRO-3 partitions the weights
            raise ConfigError("model.ema_decay does not work with ZeRO stage 3, which shards the weights across "
                              "ranks; use DDP or ZeRO stage 1/2, or leave ema_decay unset.")
        self.names = [n for n, _ in named]
        self.shadow = [t.detach().clone() for _, t in named]
        if self._restored is not None:  # resuming: continue the average the checkpoint holds
            saved = self._restored["shadow"]
            for dst, name in zip(self.shadow, self.names, strict=True):
                dst.copy_(saved[name])
            self.step = int(self._restored["step"])
            self._restored = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.shadow is None or trainer.global_step <= self.step:
            return  # no optimizer step on this batch (gradient accumulation)
        current = [t.detach() for _, t in self._tensors(pl_module.net)]
        if self.step == 0:  # the first average is the weights themselves, as in swa_utils.AveragedModel
            for dst, src in zip(self.shadow, current, strict=True):
                dst.copy_(src)
        else:
            self.update(self.shadow, current, self.step)
        self.step = trainer.global_step

    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if self.shadow is None or self.step == 0:
            return
        tensors = [t for _, t in self._tensors(pl_module.net)]
        self._backup = [t.detach().clone() for t in tensors]
        with torch.no_grad():
            for dst, src in zip(tensors, self.shadow, strict=True):
                dst.copy_(src)

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._backup is None:
            return
        with torch.no_grad():
            for dst, src in zip([t for _, t in self._tensors(pl_module.net)], self._backup, strict=True):
                dst.copy_(src)
        self._backup = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.shadow is None else {n: t.detach().cpu() for n, t in zip(self.names, self.shadow, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "step": self.step, "shadow": self.averaged_state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.shadow is not None:
            checkpoint["ema_state_dict"] = self.averaged_state_dict()
