"""Refusing Trainer settings that cannot run, with one message naming the flags and the fix, in the launching
process before Lightning starts any other process."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy

from deepres.errors import ConfigError
from deepres.pipeline.strategy import PipelineStrategy, check_pipeline
from deepres.strategies.deepspeed import DeepSpeedStrategy
from deepres.strategies.names import strategy_object
from deepres.strategies.settings import (
    TrainerSettings,
    accelerator_name,
    device_indices,
    precision_name,
    processes,
)

# Precisions the DeepSpeed strategy understands (Lightning's DeepSpeedPrecision).
_DEEPSPEED_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")


def check_trainer_config(trainer: TrainerSettings, strategy: str | Strategy | None = None, *,
                         batch_size: int | None = None, num_blocks: int | None = None,
                         reversible: bool = False) -> None:
    """Refuse Trainer settings that cannot run, with one message naming the flags and the fix.

    Runs in the launching process, before Lightning starts any other process. `batch_size` (per process, as
    the data module has it) and `num_blocks` (the net's) are checked when given; `reversible`: the net is
    built from reversible blocks.
    """
    strategy = strategy_object(trainer.get("strategy", "auto")) if strategy is None else strategy
    accelerator = accelerator_name(trainer)
    precision = precision_name(trainer)
    given = trainer.get("strategy", "auto")  # the user's spelling, for the messages
    name = given if isinstance(given, str) else f"{type(given).__module__}.{type(given).__name__}"
    on_cpu = accelerator == "cpu"

    if on_cpu and precision == "16-mixed":
        raise ConfigError(
            "--trainer.precision 16-mixed on CPU: float16 autocast is a GPU feature (Lightning would silently "
            "switch to bf16). Use --trainer.precision bf16-mixed on CPU, or run on GPUs."
        )
    if isinstance(strategy, _LightningDeepSpeedStrategy):
        _check_deepspeed(trainer, strategy, accelerator=accelerator, precision=precision, name=name)
    if isinstance(strategy, PipelineStrategy):
        check_pipeline(strategy, processes=processes(trainer), batch_size=batch_size, precision=precision,
                       trainer=trainer, num_blocks=num_blocks)
    if reversible and _finds_unused_parameters(strategy):
        raise ConfigError(
            f"--trainer.strategy {name} with reversible blocks: DDP's find_unused_parameters=True looks for every "
            "parameter in the forward graph, and a reversible run's parameters get their gradients from the "
            "recomputation in backward instead, so DDP would reduce them as unused. Use --trainer.strategy ddp "
            "with reversible blocks (every parameter of a deepres net is used in each step)."
        )
    if on_cpu and trainer.get("sync_batchnorm"):
        raise ConfigError(
            "--trainer.sync_batchnorm true on CPU: torch's SyncBatchNorm runs on GPUs only. "
            "Drop sync_batchnorm for CPU runs (each process then normalises over its own batch)."
        )


def _finds_unused_parameters(strategy: str | Strategy) -> bool:
    """Whether this DDP strategy (an object or a registry name such as ddp_find_unused_parameters_true)
    searches the forward graph for unused parameters."""
    if isinstance(strategy, DDPStrategy):
        return bool(strategy._ddp_kwargs.get("find_unused_parameters"))
    if isinstance(strategy, str) and strategy in StrategyRegistry:
        return bool(StrategyRegistry[strategy]["init_params"].get("find_unused_parameters"))
    return False


def _check_deepspeed(
    trainer: TrainerSettings, strategy: _LightningDeepSpeedStrategy, *, accelerator: str, precision: str, name: str
) -> None:
    config: Mapping[str, Any] = strategy.config or {}
    flag = f"--trainer.strategy {name}"
    if accelerator not in ("cpu", "cuda"):
        raise ConfigError(f"{flag} runs on CUDA GPUs or CPUs, not on {accelerator}. Use --trainer.accelerator cpu or cuda.")
    if accelerator == "cpu" and not isinstance(strategy, DeepSpeedStrategy):
        raise ConfigError(
            f"{flag} is Lightning's DeepSpeed strategy, which refuses CPUs. Use "
            "`class_path: deepres.strategies.DeepSpeedStrategy` (same init_args), or a name such as deepspeed_stage_2."
        )
    if precision not in _DEEPSPEED_PRECISIONS:
        raise ConfigError(f"{flag} with --trainer.precision {precision}: DeepSpeed runs {', '.join(_DEEPSPEED_PRECISIONS)}.")
    if accelerator == "cpu" and precision == "16-true":
        raise ConfigError(
            f"{flag} with --trainer.precision 16-true on CPU: DeepSpeed's CPU float16 needs AVX512-FP16 "
            "processors. Use --trainer.precision bf16-mixed on CPU."
        )
    if trainer.get("gradient_clip_algorithm") == "value":
        raise ConfigError(
            f"{flag} with --trainer.gradient_clip_algorithm value: DeepSpeed clips gradients by norm only. "
            "Use --trainer.gradient_clip_algorithm norm, or --trainer.strategy ddp to clip by value."
        )
    if trainer.get("sync_batchnorm"):
        raise ConfigError(
            f"{flag} with --trainer.sync_batchnorm true: Lightning converts BatchNorm to SyncBatchNorm only in its "
            "DDP strategy; under DeepSpeed the flag would be silently ignored. Use --trainer.strategy ddp for "
            "SyncBatchNorm (CIFAR/ImageNet ResNets fit in GPU memory under DDP), or drop sync_batchnorm."
        )
    indices = device_indices(trainer.get("devices"))
    if accelerator == "cuda" and indices is not None and indices != list(range(len(indices))):
        raise ConfigError(
            f"{flag} with --trainer.devices {indices}: DeepSpeed needs GPUs 0..N-1. Select GPUs with "
            f"CUDA_VISIBLE_DEVICES={','.join(map(str, indices))} and --trainer.devices {len(indices)}."
        )
    _check_deepspeed_json(config, flag=flag, precision=precision, trainer=trainer)


def _check_deepspeed_json(config: Mapping[str, Any], *, flag: str, precision: str, trainer: TrainerSettings) -> None:
    """Refuse DeepSpeed config keys (usually from a hand-written JSON) that contradict the Trainer or that
    Lightning's DeepSpeed strategy cannot run."""
    if "pipeline" in config:
        raise ConfigError(
            f"{flag} with a `pipeline` section: Lightning drives DeepSpeed's ZeRO engine, not its pipeline engine "
            "(and ZeRO-2/3 cannot be combined with pipeline parallelism). Remove the pipeline section; to split "
            "the net by depth use --trainer.strategy pipeline (torch.distributed.pipelining, without DeepSpeed), "
            "or keep ZeRO and use activation checkpointing (--model.memory.activation_checkpointing)."
        )
    if int(config.get("tensor_parallel", {}).get("autotp_size", 1) or 1) > 1 or int(config.get("sequence_parallel_size", 1)) > 1:
        raise ConfigError(
            f"{flag} with tensor_parallel.autotp_size or sequence_parallel_size > 1: DeepSpeed's AutoTP and "
            "sequence parallelism split transformer attention layers; deepres's residual nets have none. "
            "Remove them and shard with ZeRO stage 3 (deepspeed_stage_3) instead."
        )
    if "gradient_accumulation_steps" in config or "train_batch_size" in config:
        raise ConfigError(
            f"{flag}: the DeepSpeed config sets gradient_accumulation_steps or train_batch_size, which deepres "
            "derives from --trainer.accumulate_grad_batches and --data.batch_size. Remove them from the JSON."
        )
    wants = {"fp16": precision in ("16-mixed", "16-true"), "bf16": precision in ("bf16-mixed", "bf16-true")}
    for key, wanted in wants.items():
        enabled = bool(config.get(key, {}).get("enabled", False))
        if key in config and enabled != wanted:
            raise ConfigError(
                f"{flag}: the DeepSpeed config has {key}.enabled={str(enabled).lower()} but --trainer.precision "
                f"is {precision}. Remove the {key} section (deepres writes it from --trainer.precision) or set "
                "the precision to match."
            )
    clip = trainer.get("gradient_clip_val")
    if clip and "gradient_clipping" in config and float(config["gradient_clipping"]) != float(clip):
        raise ConfigError(
            f"{flag}: the DeepSpeed config has gradient_clipping={config['gradient_clipping']} but "
            f"--trainer.gradient_clip_val is {clip}. Set it in one place (deepres writes gradient_clipping from "
            "--trainer.gradient_clip_val)."
        )


