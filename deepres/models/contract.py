"""The net contract: what code outside a net (the pipeline, the diagnostics, the memory planner, weight
loading) may rely on.

A deepres net is `stem → blocks → head`:

    net.blocks      the repeated structure (a BlockStack, ReversibleStack or ModuleList), walked from outside
    net.entry(x)    everything before the first block (the stem, flattening, an initial state)
    net.exit(y)     everything after the last block (pooling, the head)

so that `net(x) == net.exit(net.blocks(net.entry(x)))`. A LightningModule of deepres holds its net as
`self.net`. These functions are the one place that looks the parts up; everything else calls them.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class DeepNet(Protocol):
    blocks: nn.Module

    def entry(self, x: Any) -> Any: ...

    def exit(self, y: Any) -> Any: ...


def net_of(module: Any) -> nn.Module | None:
    """The single-device net: a deepres LightningModule's `net`, or `module` itself when it is a net."""
    if not isinstance(module, nn.Module):
        return None
    return module._modules.get("net") or module


def blocks_of(module: Any) -> nn.Module | None:
    """The repeated blocks of a net (or of the net inside a LightningModule); None if it has none."""
    net = net_of(module)
    blocks = net._modules.get("blocks") if net is not None else None
    return blocks if isinstance(blocks, nn.Module) else None


def is_deep_net(net: Any) -> bool:
    """Whether `net` keeps the whole contract (blocks, entry, exit), so it can be cut into pipeline stages."""
    return isinstance(net, DeepNet) and blocks_of(net) is not None
