"""Strategy names and objects from the YAML -> the strategy object deepres runs."""

from __future__ import annotations

from datetime import timedelta

from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry

from deepres.errors import ConfigError
from deepres.lightning_compat import deepspeed_available
from deepres.pipeline.strategy import PipelineStrategy
from deepres.strategies.deepspeed import DeepSpeedStrategy, lightning_deepspeed_names


def strategy_object(strategy: str | Strategy, *, timeout: timedelta | None = None,
                     processes: int = 1) -> str | Strategy:
    """A DeepSpeed name becomes deepres's DeepSpeedStrategy with Lightning's arguments for that name; a DDP name
    (and `auto` for several processes, which Lightning would run as DDP) becomes Lightning's class with its
    registered arguments and `timeout`; `pipeline` becomes deepres's PipelineStrategy with its defaults;
    strategy objects pass through unchanged."""
    if not isinstance(strategy, str):
        return strategy
    name = strategy.lower()
    deepspeed_names = lightning_deepspeed_names()
    timeout_args = {} if timeout is None else {"timeout": timeout}
    if name in deepspeed_names:
        _require_deepspeed(name)
        return DeepSpeedStrategy(**deepspeed_names[name], **timeout_args)
    if name == "pipeline":
        return PipelineStrategy(**timeout_args)
    if name == "auto" and processes > 1 and timeout is not None:
        return DDPStrategy(**timeout_args)
    if name in StrategyRegistry and issubclass(StrategyRegistry[name]["strategy"], DDPStrategy) and timeout_args:
        entry = StrategyRegistry[name]
        return entry["strategy"](**{**entry["init_params"], **timeout_args})
    if name != "auto" and name not in StrategyRegistry:
        raise ConfigError(
            f"--trainer.strategy {strategy!r} is not a strategy name. Use one of: auto, ddp, pipeline, "
            f"{', '.join(sorted(deepspeed_names))}; or give `class_path: deepres.strategies.DeepSpeedStrategy` "
            "with init_args (stage, offload_optimizer, offload_parameters, config) in the YAML."
        )
    return name


def _require_deepspeed(name: str) -> None:
    if not deepspeed_available():
        raise ConfigError(
            f"--trainer.strategy {name} needs DeepSpeed, which is not installed. "
            "Run scripts/install.sh (or `pip install --no-build-isolation deepspeed`), or use --trainer.strategy ddp."
        )


