"""``trainer.devices`` read once, the same way everywhere: how many processes per node, and which devices.

Lightning accepts a count (``2``, ``"2"``), "all the node has" (``"auto"``, ``-1``) and explicit indices
(``[0, 3]``, ``"0,3"``, ``"1,"``). ``deepres submit`` needs the count to ask SLURM for one task per device, and
deepres.strategies needs both to check the strategy; both read it through ``parse_devices``.

Standard library only: ``deepres submit`` imports it without torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deepres.errors import ConfigError


@dataclass(frozen=True)
class Devices:
    count: int | None
    """Processes per node; None for "auto" / -1 (decided on the node from what it has)."""
    indices: tuple[int, ...] | None = None
    """The device indices given explicitly, else None."""


def parse_devices(devices: Any) -> Devices:
    """``trainer.devices`` as a count and, when given, indices. Raises ConfigError for anything else."""
    if isinstance(devices, bool):
        raise ConfigError(f"trainer.devices={devices!r} is not a device count; give a number such as 2.")
    if isinstance(devices, (list, tuple)):
        indices = tuple(_index(d, devices) for d in devices)
        return Devices(count=len(indices), indices=indices)
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return Devices(count=None)
        if "," in text:  # "0,3" or "1,": device indices, as Lightning reads them
            indices = tuple(_index(d, devices) for d in text.split(",") if d.strip())
            return Devices(count=len(indices), indices=indices)
        if text.isdigit():
            devices = int(text)
    if isinstance(devices, int) and devices >= -1:
        return Devices(count=None) if devices == -1 else Devices(count=devices)
    raise ConfigError(f"trainer.devices={devices!r} is not a device count; give a number such as 2, "
                      "a list of device indices such as [0, 1], or auto.")


def _index(value: Any, devices: Any) -> int:
    text = str(value).strip()
    if not text.isdigit():
        raise ConfigError(f"trainer.devices={devices!r}: {value!r} is not a device index; give e.g. [0, 1].")
    return int(text)
