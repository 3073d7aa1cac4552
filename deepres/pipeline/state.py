"""Gradients and checkpoints of a net whose blocks live on several pipeline ranks.

Gradients: each stage's replicas average their gradients (one all-reduce per dtype over the stage's
data-parallel group); clipping by norm uses the norm over *all* stages (the squared norms of the stages
summed over the pipeline group), so a clipped pipeline step is the clipped step of the one-device net.

Checkpoints: the first replica's stages send their state dicts to global rank 0, which writes one file
holding the full model, the same keys a one-device run saves; optimizer states are merged the same way,
into the one-device optimizer's layout (parameter groups by position, parameters in the net's order,
each group also listing its `param_names`). Every rank reads its own parameters back out of that file.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepres.errors import ConfigError


# ------------------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------------------
def average_gradients(params: Iterable[nn.Parameter], group: dist.ProcessGroup, size: int) -> None:
    """Average `.grad` over the `size` ranks of `group` (the replicas of one stage), one flat buffer per dtype."""
    if size <= 1:
        return
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = defaultdict(list)
    for p in params:
        if p.grad is not None:
            by_kind[(p.grad.dtype, p.grad.device)].append(p.grad)
    for grads in by_kind.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        offset = 0
        for g in grads:
            g.copy_(flat[offset: offset + g.numel()].view_as(g))
            offset += g.numel()


def global_grad_norm(params: Iterable[nn.Parameter], group: dist.ProcessGroup | None, device: torch.device,
                     norm_type: float = 2.0) -> torch.Tensor:
    """The gradient norm of the whole net: each rank's ‖g‖^p summed over the pipeline group."""
    grads = [p.grad for p in params if p.grad is not None]
    if norm_type == float("inf"):
        local = torch.stack([g.detach().abs().max().float() for g in grads]).max() if grads else \
            torch.zeros((), device=device)
        if group is not None:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=group)
        return local
    if grads:
        local = torch.stack(torch._foreach_norm(grads, norm_type, dtype=torch.float32)).pow(norm_type).sum()
    else:
        local = torch.zeros((), device=device)
    if group is not None:
        dist.all_reduce(local, group=group)
    return local.pow(1.0 / norm_type)


def clip_by_global_norm(params: list[nn.Parameter], max_norm: float, group: dist.ProcessGroup | None,
                        device: torch.device, norm_type: float = 2.0) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_'s rule (scale by max_norm / (norm + 1e-6) when that is < 1) with the norm
    of the whole net."""
    total = global_grad_norm(params, group, device, norm_type)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, scale.to(grads[0].device))
    return total


# ------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------
def _cpu(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu(v) for v in tree)
    return tree


def gather_to_rank0(obj: Any, group: dist.ProcessGroup | None, *, sends: bool) -> list[Any] | None:
    """Every rank of `group` (the first replica's pipeline group, which holds global rank 0) sends `obj`;
    global rank 0 gets the list, in stage-rank order. Ranks with `sends` False (other replicas) take no part."""
    if not sends:
        return None
    if group is None:
        return [obj]
    received: list[Any] | None = [None] * dist.get_world_size(group) if dist.get_rank() == 0 else None
    dist.gather_object(_cpu(obj), received, dst=0, group=group)
    return received


def merge_state_dicts(parts: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
    """One state dict from the stages' parts, in the one-device net's key order."""
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part)
    missing = [k for k in order if k not in merged]
    if missing:
        raise RuntimeError(f"the pipeline stages together lack {len(missing)} keys of the net, e.g. {missing[:3]}")
    return {k: merged[k] for k in order} | {k: v for k, v in merged.items() if k not in set(order)}


def named_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """This rank's optimizer state keyed by parameter name: {"groups": [{hyper-parameters, "names"}],
    "state": {name: state}}."""
    saved = optimizer.state_dict()
    index_to_name: dict[int, str] = {}
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            index_to_name[index] = names[id(p)]
            index += 1
    groups = []
    for group in saved["param_groups"]:
        hyper = {k: v for k, v in group.items() if k not in ("params", "param_names")}
        groups.append({**hyper, "names": [index_to_name[i] for i in group["params"]]})
    return {"groups": groups, "state": {index_to_name[i]: s for i, s in saved["state"].items()}}


def merge_optimizer_states(parts: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
    """The one-device optimizer state dict from the stages' named states: group g holds every stage's
    group g, its parameters in the net's order (`order`), numbered as torch numbers them."""
    position = {name: i for i, name in enumerate(order)}
    groups: list[dict[str, Any]] = []
    for part in parts:
        for g, group in enumerate(part["groups"]):
            if g == len(groups):
                groups.append({k: v for k, v in group.items() if k != "names"} | {"names": []})
            groups[g]["names"] += group["names"]
    state_by_name = {name: s for part in parts for name, s in part["state"].items()}
    param_groups, state, index = [], {}, 0
    for group in groups:
        names = sorted(group.pop("names"), key=lambda n: position.get(n, len(position)))
        indices = list(range(index, index + len(names)))
        for i, name in zip(indices, names, strict=True):
            if name in state_by_name:
                state[i] = state_by_name[name]
        index += len(names)
        param_groups.append({**group, "params": indices, "param_names": names})
    return {"state": state, "param_groups": param_groups}


def local_optimizer_state(full: dict[str, Any], optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """This rank's share of a one-device optimizer state dict (written by `merge_optimizer_states`)."""
    if not all("param_names" in g for g in full["param_groups"]):
        raise ConfigError(
            "this checkpoint's optimizer state has no parameter names (it was not written by "
            "--trainer.strategy pipeline), so the pipeline cannot tell which state belongs to which stage. Resume it "
            "with the strategy that wrote it, or start from its weights with --model.init_from."
        )
    index_of = {name: i for g in full["param_groups"] for i, name in zip(g["params"], g["param_names"], strict=True)}
    state, param_groups, index = {}, [], 0
    for g, group in enumerate(optimizer.param_groups):
        saved = full["param_groups"][g] if g < len(full["param_groups"]) else {}
        indices = []
        for p in group["params"]:
            name = names[id(p)]
            if name in index_of and index_of[name] in full["state"]:
                state[index] = full["state"][index_of[name]]
            indices.append(index)
            index += 1
        hyper = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
        param_groups.append({**{k: v for k, v in group.items() if k != "params"}, **hyper, "params": indices})
    return {"state": state, "param_groups": param_groups}
