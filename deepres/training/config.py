"""Typed hyper-parameter groups shared by every deepres LightningModule.

Each group is a frozen, keyword-only dataclass with one docstring per field; LightningCLI (through
jsonargparse) turns a group into nested keys, so the optimizer's learning rate is
`--model.optim.lr` on the command line and

    model:
      optim:
        lr: 0.05

in YAML, and `deepres fit --print_config` prints the groups in that shape.

In a checkpoint's `hyper_parameters` the groups are stored as plain dicts (`as_hparams`), so a
checkpoint holds only built-in types and loads with `torch.load(weights_only=True)`; the modules
accept either form (`coerce`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Literal, TypeVar

from deepres.errors import ConfigError

OptimizerName = Literal["sgd", "adamw", "adam"]
ScheduleName = Literal["constant", "cosine", "step"]


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """The optimizer (`model.optim`)."""

    name: OptimizerName = "sgd"
    """sgd (momentum, Nesterov) | adamw | adam."""
    lr: float = 0.05
    """Peak learning rate (reached after the schedule's warm-up)."""
    momentum: float = 0.9
    """SGD momentum."""
    nesterov: bool = True
    """Nesterov momentum for SGD."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam(W) betas."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (SGD, Adam) decay of weight matrices and kernels only: norms, biases and
    gate biases are never decayed."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))  # a list from YAML or a checkpoint


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """The learning-rate schedule (`model.schedule`), per optimizer step."""

    name: ScheduleName = "cosine"
    """constant | cosine (to `min_lr_ratio`·lr at the last step) | step (×`gamma` at each milestone)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up before the schedule starts."""
    milestones: list[int] = field(default_factory=list)
    """Optimizer steps at which the step schedule multiplies the lr by `gamma`."""
    gamma: float = 0.1
    """Step-schedule factor."""
    min_lr_ratio: float = 0.0
    """Cosine floor, as a fraction of the peak lr."""


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    """How the net is executed, which changes memory and speed but not the maths (`model.memory`)."""

    activation_checkpointing: int | str = 0
    """Recompute activations in backward: every k blocks (k >= 1), "sqrt" (segments of about √L
    blocks), "all"; "selective" (keep matmul/conv outputs, recompute norms, activations and gates;
    also "selective:k", "selective:sqrt"); "auto" (the cheapest setting whose measured peak fits
    `memory_budget_gb`); 0 = off."""
    compile: bool = False
    """torch.compile each block."""
    channels_last: bool = False
    """NHWC memory layout for conv nets (faster convolutions on GPUs with tensor cores)."""
    memory_budget_gb: float | None = None
    """For activation_checkpointing "auto": GB one training step may allocate on a device beyond the
    parameters and optimizer state (deepres.parallelize.memory_budget)."""



G = TypeVar("G")


def coerce(group: type[G], value: G | Mapping[str, Any] | None, *, flag: str) -> G:
    """`value` as an instance of `group`: an instance passes, a mapping (a checkpoint's saved
    hyper-parameters, a dict written in Python) is checked key by key."""
    if value is None:
        return group()
    if isinstance(value, group):
        return value
    if isinstance(value, Mapping):
        known = {f.name for f in fields(group)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{flag}: unknown key(s) {', '.join(unknown)}; {flag} takes {', '.join(sorted(known))}.")
        return group(**value)
    raise ConfigError(f"{flag}: expected a {group.__name__} or a mapping, got {type(value).__name__}.")


def as_hparams(value: Any) -> Any:
    """A group as a plain dict (tuples as lists), for checkpoints and loggers."""
    if is_dataclass(value) and not isinstance(value, type):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(value).items()}
    return value

