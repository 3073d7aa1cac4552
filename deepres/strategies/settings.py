"""Reading the Trainer's keyword arguments: how many processes, on what accelerator, in what precision."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator, CUDAAccelerator

from deepres.devices import parse_devices
from deepres.errors import ConfigError
from deepres.lightning_compat import auto_accelerator, unified_precision


class TrainerSettings(Protocol):
    """The Trainer's keyword arguments: a dict, or the jsonargparse Namespace LightningCLI parsed."""

    def get(self, key: str, default: Any = None) -> Any: ...


def processes(trainer: TrainerSettings) -> int:
    """How many processes the Trainer's arguments ask for (devices x nodes; 1 if unknown)."""
    count = parse_devices(trainer.get("devices", "auto")).count or 1  # "auto": 1 until the node says more
    return max(count, 1) * int(trainer.get("num_nodes") or 1)


def accelerator_name(trainer: TrainerSettings) -> str:
    """cpu, cuda, mps or tpu: what Lightning will run on for this `accelerator` argument."""
    accelerator = trainer.get("accelerator", "auto")
    if isinstance(accelerator, Accelerator):
        return {CPUAccelerator: "cpu", CUDAAccelerator: "cuda"}.get(type(accelerator), type(accelerator).__name__)
    name = str(accelerator).lower()
    if name == "auto":
        return auto_accelerator()
    if name == "gpu":  # Lightning's "gpu": CUDA, else Apple's MPS; on a machine with neither it was meant for CUDA
        return "mps" if not torch.cuda.is_available() and torch.backends.mps.is_available() else "cuda"
    return name


def precision_name(trainer: TrainerSettings) -> str:
    precision = trainer.get("precision")
    try:
        return str(unified_precision(precision) or "32-true")
    except ValueError as err:
        raise ConfigError(f"--trainer.precision {precision!r}: {err}") from None


def device_indices(devices: Any) -> list[int] | None:
    """The GPU indices a `devices` argument names explicitly ([1, 3] or "1,3"), else None (a count)."""
    indices = parse_devices(devices).indices if devices is not None else None
    return list(indices) if indices is not None else None


