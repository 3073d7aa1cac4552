"""Standard image-recipe pieces, from the libraries that own them (torchvision.transforms.v2).

- `auto_augment("randaugment" | "trivialaugment")`: RandAugment (Cubuk et al. 2020: N ops of
  magnitude M, ImageNet ResNet-50 with N=2, M=9) or TrivialAugmentWide (Müller & Hutter 2021: one
  op of random magnitude, no parameters), applied per image in the data-loader workers.
- `BatchMix`: MixUp (Zhang et al. 2018: x = λx_i + (1-λ)x_j, the labels mixed alike, λ ~ Beta(α, α))
  and CutMix (Yun et al. 2019: a box of x_j pasted into x_i, λ = the area kept), applied to a whole
  batch on the device after the host-to-device copy, so that the workers ship uint8 images and plain
  labels. With both on, each batch gets one of them (as timm's Mixup with switch probability 0.5).
  Labels become class probabilities; deepres's Classifier takes them in its cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torchvision.transforms import v2

from deepres.errors import ConfigError

AutoAugmentName = Literal["none", "randaugment", "trivialaugment"]


def apply_seeded(policy: Callable, image, seed: int):
    """`policy(image)` with torch's CPU generator seeded by `seed`, and put back afterwards: torchvision's
    policies draw from that generator only, and a sample's own seed makes its draws the same in a resumed epoch
    and with any number of workers (with num_workers 0 the generator is the training process's, hence put back).
    CUDA's generators are not touched."""
    state = torch.get_rng_state()
    try:
        torch.default_generator.manual_seed(seed)
        return policy(image)
    finally:
        torch.set_rng_state(state)


def auto_augment(name: str, num_ops: int = 2, magnitude: int = 9) -> Callable | None:
    """The per-image policy for `name` (PIL images or uint8 tensors in, the same type out); None for none."""
    if name == "none":
        return None
    if name == "randaugment":
        if not (num_ops >= 1 and 0 <= magnitude <= 30):
            raise ConfigError(f"RandAugment with num_ops={num_ops}, magnitude={magnitude}: give num_ops >= 1 and "
                              "a magnitude in 0..30 (Cubuk et al. 2020 use 2 and 9 for ImageNet).")
        return v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    if name == "trivialaugment":
        return v2.TrivialAugmentWide()
    raise ConfigError(f"data.auto_augment={name!r}: choose none, randaugment or trivialaugment.")


class BatchMix:
    """MixUp and/or CutMix of a (B, C, H, W) batch with (B,) labels -> mixed batch, (B, K) soft labels."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0) -> None:
        for name, alpha in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if alpha < 0:
                raise ConfigError(f"data.{name}={alpha}: give alpha > 0 to switch it on, or 0 for off.")
        if num_classes < 2 and (mixup_alpha or cutmix_alpha):
            raise ConfigError("MixUp/CutMix mix class labels: they need a classification task with >= 2 classes.")
        parts = []
        if mixup_alpha > 0:
            parts.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            parts.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = None if not parts else parts[0] if len(parts) == 1 else v2.RandomChoice(parts)

    @property
    def enabled(self) -> bool:
        return self.mix is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is None or len(labels) < 2:
            return images, labels
        return self.mix(images, labels)
