"""One public way to build a model: `create_model(name, **overrides)` (as timm's `create_model`).

Each registered name is a small function that fixes a family's arguments (`resnet50` is
`imagenet_resnet(layers=[3, 4, 6, 3], body="bottleneck")`, declared with `@register_variant`);
overrides are passed to it, so any argument of the family (`depth=`, `gate=`, `width=`, …) can be
changed by name, and a misspelt one is refused.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

from torch import nn

from deepres.errors import ConfigError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _REGISTRY:
        raise ValueError(f"model {fn.__name__!r} registered twice")
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_arguments(name: str) -> list[str]:
    """The override names `create_model(name, ...)` accepts."""
    fn = _lookup(name)
    params = inspect.signature(fn).parameters.values()
    return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def create_model(name: str, **overrides) -> nn.Module:
    fn = _lookup(name)
    accepted = model_arguments(name)
    unknown = [k for k in overrides if k not in accepted]
    if unknown:
        hints = "; ".join(_did_you_mean(k, accepted) for k in unknown)
        raise ConfigError(
            f"model {name!r} has no argument {', '.join(map(repr, unknown))} ({hints}). "
            f"Its arguments are: {', '.join(accepted)}."
        )
    return fn(**overrides)


def _lookup(name: str) -> Callable[..., nn.Module]:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ConfigError(
            f"unknown model {name!r}.{hint} Run `python -c \"import deepres.models as m; print(m.list_models())\"` "
            f"for all names; registered: {', '.join(list_models())}."
        )
    return _REGISTRY[name]


def _did_you_mean(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f"did you mean {close[0]!r} for {key!r}?" if close else f"{key!r} is not an argument"


def register_variant(family: Callable[..., nn.Module], **defaults) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator (timm's style, one short function per named model): register the decorated function
    as `family` with `defaults` changed.

        @register_variant(imagenet_resnet, layers=[3, 4, 6, 3], body="bottleneck")
        def resnet50(**kwargs) -> ResNet:
            \"\"\"ImageNet ResNet-50 (He et al. 2015).\"\"\"
            return imagenet_resnet(**kwargs)

    The function is called with the defaults merged under the caller's overrides, and shows the
    family's signature with the new defaults, so every family argument stays overridable by name and
    `model_arguments` lists it."""
    sig = inspect.signature(family)
    unknown = set(defaults) - set(sig.parameters)
    if unknown:
        raise TypeError(f"{family.__name__} has no parameter(s) {sorted(unknown)}")

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        def build(**overrides):
            return fn(**{**defaults, **overrides})

        build.__name__, build.__qualname__, build.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        build.__module__ = fn.__module__
        build.__signature__ = sig.replace(
            parameters=[p.replace(default=defaults.get(p.name, p.default)) for p in sig.parameters.values()]
        )
        return register_model(build)

    return decorate


def register_variants(family: Callable[..., nn.Module], variants: dict[str, tuple[str, dict]]) -> None:
    """`register_variant` as a table, for a family with many named sizes: register each
    `name: (docstring, defaults)` as `family` with `defaults` changed."""
    for name, (doc, defaults) in variants.items():
        def variant(**kwargs) -> nn.Module:
            return family(**kwargs)

        variant.__name__ = variant.__qualname__ = name
        variant.__doc__, variant.__module__ = doc, family.__module__
        register_variant(family, **defaults)(variant)
