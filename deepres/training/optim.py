"""Optimisers and learning-rate schedules from typed settings.

Weight decay applies to weight matrices and conv kernels only: norms, biases and gate biases are
excluded (a decayed gate bias would drift from its depth-aware initial value toward 0, i.e. toward
closing the carry path: docs/science.md#the-highway-transform-gate-bias). A model with a depth
parameterisation gets per-group learning rates, weight decays and Adam ε for its scaled blocks
(deepres.models.depth_scaling).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from deepres.models.depth_scaling import hidden_depth_ratios, hidden_rule
from deepres.training.config import OptimizerConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float, *, optimizer: str = "sgd", lr: float | None = None,
                 eps: float = 1e-8) -> list[dict]:
    """Decay and no-decay groups; with a depth parameterisation (deepres.models.depth_scaling) the parameters
    of the scaled blocks get their own groups, whose lr, weight decay and Adam ε follow its rule for `optimizer`."""
    ratios = hidden_depth_ratios(model)
    split: dict[tuple[float, bool], list] = {}
    for _name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # 1-D tensors are biases (including gate biases) and norm scales/shifts
        split.setdefault((ratios.get(id(p), 1.0), p.ndim > 1), []).append(p)
    groups = [{"params": split.get((1.0, True), []), "weight_decay": weight_decay}]
    if (1.0, False) in split:
        groups.append({"params": split[1.0, False], "weight_decay": 0.0})
    for (ratio, decayed), params in split.items():
        if ratio == 1.0:
            continue
        if lr is None:
            raise ValueError("param_groups needs the base lr for a model with depth-scaled blocks")
        rule = hidden_rule(optimizer, ratio)
        group = {"params": params, "lr": lr * rule.lr, "weight_decay": weight_decay * rule.weight_decay if decayed else 0.0}
        if optimizer in ("adam", "adamw"):
            group["eps"] = eps * rule.eps
        groups.append(group)
    return groups


def implementation(model: nn.Module, *, fused: bool = True) -> dict[str, bool]:
    """torch.optim's fused kernels where every parameter allows them (float, on CPU or CUDA) and
    `fused` is not switched off.

    The same update, one kernel per parameter group instead of a Python loop over tensors: on the
    default job's 400 parameter tensors (1 CPU thread) SGD with Nesterov momentum takes 0.75 ms
    instead of 3.85 ms per step, AdamW 1.6 ms instead of 12.3 ms. torch picks the loop on CPU by
    default (its foreach kernels are CUDA-only fast paths).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    ok = fused and bool(params) and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if ok else {}


def fused_allowed(*, precision: str, gradient_clip_val: float | None) -> bool:
    """Whether a fused optimizer may run under these Trainer settings.

    A fused optimizer unscales gradients inside its own step (torch marks it `_step_supports_amp_scaling`),
    so under mixed precision Lightning cannot clip gradients before the step and refuses the pair: clipping
    with bf16-mixed or 16-mixed therefore takes the plain implementation (the same update).
    """
    return not (gradient_clip_val and "mixed" in str(precision))


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, *, fused: bool = True) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, optimizer=cfg.name, lr=cfg.lr)
    impl = implementation(model, fused=fused)
    betas = tuple(cfg.betas)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, **impl)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, **impl)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, **impl)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_lambda(cfg: ScheduleConfig, *, total_steps: int | Callable[[], int]):
    """Multiplier of the base lr at optimizer step s: linear warm-up, then the schedule.

    `total_steps` (the cosine schedule's horizon) may be a function: it is then called only when a step past
    the warm-up needs it, not when the scheduler is built (deepres.training.module says why)."""
    schedule, warmup_steps, milestones = cfg.name, cfg.warmup_steps, list(cfg.milestones)
    gamma, min_lr_ratio = cfg.gamma, cfg.min_lr_ratio
    horizon = total_steps if callable(total_steps) else (lambda: total_steps)

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "cosine":
            if step <= warmup_steps:
                return 1.0  # the peak, whatever the horizon
            span = max(1, horizon() - warmup_steps)
            progress = min(1.0, (step - warmup_steps) / span)
            return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if schedule == "step":
            return gamma ** sum(step >= m for m in milestones)
        return 1.0

    return factor
