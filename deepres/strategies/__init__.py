"""Distributed strategies from the Trainer config: DDP, DeepSpeed ZeRO 1-3 (on GPUs and on CPUs), pipeline
parallelism, and the checks.

The training CLI calls one function before it builds the Trainer::

    kwargs["strategy"] = resolve_strategy(cfg.trainer, batch_size=datamodule.batch_size, model=model)

It refuses impossible combinations with one `ConfigError` (before any process starts) and returns what
`Trainer(strategy=...)` takes: Lightning's own name for DDP and friends (Lightning picks gloo on CPUs and
NCCL on GPUs), a `deepres.strategies.DeepSpeedStrategy` whose DeepSpeed config is complete, or a
`deepres.strategies.PipelineStrategy`.

    settings.py    reading the Trainer's arguments (processes, accelerator, precision, device indices)
    names.py       strategy names and YAML objects -> strategy objects
    checks.py      the refusals
    resolve.py     resolve_strategy: the three above, and the DeepSpeed config completed
    deepspeed.py   DeepSpeed ZeRO on CPUs and GPUs, the config translation

The pipeline strategy lives with the rest of the pipeline, in deepres.pipeline.strategy.
"""

from deepres.pipeline.strategy import PipelineStrategy
from deepres.strategies.checks import check_trainer_config
from deepres.strategies.deepspeed import (
    CPU_ADAM_OP,
    CPU_OPS,
    DeepSpeedStrategy,
    build_deepspeed_ops,
    deepspeed_config_from_trainer,
    extension_cache_dir,
    lightning_deepspeed_names,
    use_deepspeed_cpu_accelerator,
    use_persistent_extension_cache,
)
from deepres.strategies.resolve import nccl_watchdog_environment, resolve_strategy
from deepres.strategies.settings import TrainerSettings

__all__ = [
    "CPU_ADAM_OP", "CPU_OPS", "DeepSpeedStrategy", "PipelineStrategy", "TrainerSettings", "build_deepspeed_ops",
    "check_trainer_config", "deepspeed_config_from_trainer",
    "extension_cache_dir", "lightning_deepspeed_names", "nccl_watchdog_environment", "resolve_strategy",
    "use_deepspeed_cpu_accelerator", "use_persistent_extension_cache",
]
