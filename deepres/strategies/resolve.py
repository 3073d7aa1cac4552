"""Trainer settings -> what `Trainer(strategy=...)` takes."""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from lightning.pytorch.strategies import Strategy

from deepres.models.contract import blocks_of
from deepres.pipeline.strategy import PipelineStrategy
from deepres.strategies.checks import check_trainer_config
from deepres.strategies.deepspeed import (
    deepspeed_config_from_trainer,
    loss_scaling,
    use_persistent_extension_cache,
)
from deepres.strategies.names import strategy_object
from deepres.strategies.settings import TrainerSettings, accelerator_name, precision_name, processes


def resolve_strategy(trainer: TrainerSettings, *, batch_size: int | None = None,
                     timeout: timedelta | None = None, model: Any = None) -> str | Strategy:
    """What to pass as `Trainer(strategy=...)` for these Trainer keyword arguments, after checking them.

    `trainer` holds the Trainer's arguments as the CLI parsed them (accelerator, devices, num_nodes,
    strategy, precision, accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm,
    sync_batchnorm; missing keys take the Trainer's defaults); `batch_size` is the per-process batch;
    `timeout` how long a collective may wait for another rank (torch's default: 30 minutes); `model` the
    LightningModule, if built (the pipeline checks its number of blocks).
    Raises `ConfigError` for a combination that cannot run.
    """
    strategy = strategy_object(trainer.get("strategy", "auto"), timeout=timeout, processes=processes(trainer))
    check_trainer_config(trainer, strategy, batch_size=batch_size, num_blocks=_num_blocks(model),
                         reversible=_reversible(model))
    if timeout is not None and accelerator_name(trainer) == "cuda":
        nccl_watchdog_environment(timeout)
    if isinstance(strategy, PipelineStrategy):
        strategy.batch_size = batch_size
    if not isinstance(strategy, _LightningDeepSpeedStrategy):
        return strategy
    assert isinstance(strategy.config, dict)
    config = deepspeed_config_from_trainer(
        strategy.config,
        precision=precision_name(trainer),
        accumulate_grad_batches=int(trainer.get("accumulate_grad_batches") or 1),
        gradient_clip_val=trainer.get("gradient_clip_val"),
        micro_batch_size=batch_size,
        loss_scaling=loss_scaling(strategy),
    )
    # Lightning writes gradient_accumulation_steps itself, from the same Trainer argument, and refuses a
    # config that already has it; everything else it keeps as given.
    config.pop("gradient_accumulation_steps")
    strategy.config = config
    use_persistent_extension_cache()
    return strategy


def nccl_watchdog_environment(timeout: timedelta) -> dict[str, str]:
    """NCCL's watchdog settings for a collective timeout (set unless already in the environment; returned).

    As torch documents them (ProcessGroupNCCL environment variables): a collective that exceeds the process
    group's timeout makes the watchdog abort the communicator and end the process
    (TORCH_NCCL_ASYNC_ERROR_HANDLING=1), after writing the flight recorder's record of the last collectives
    (TORCH_NCCL_DUMP_ON_TIMEOUT with a trace buffer), which shows the rank that did not join; the monitoring
    thread ends a process whose watchdog itself hangs, after a heartbeat timeout longer than the collective
    timeout."""
    settings = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
        "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000",
        "TORCH_NCCL_ENABLE_MONITORING": "1",
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(int(timeout.total_seconds()) + 120),
    }
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in settings}


def _reversible(model: Any) -> bool:
    """Whether a deepres LightningModule's net is built from reversible blocks."""
    from deepres.models.reversible import ReversibleStack

    return isinstance(blocks_of(model), ReversibleStack)


def _num_blocks(model: Any) -> int | None:
    """len(model.net.blocks) of a deepres LightningModule (None for anything else)."""
    blocks = blocks_of(model)
    return len(blocks) if blocks is not None and hasattr(blocks, "__len__") else None
