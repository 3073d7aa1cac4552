"""Distributed strategies from the Trainer config: DDP, DeepSpeed ZeRO 1-3 (on GPUs and on CPUs), and the checks.

The training CLI calls one function before it builds the Trainer::

    kwargs["strategy"] = resolve_strategy(cfg.trainer, batch_size=datamodule.batch_size)

It refuses impossible combinations with one `ConfigError` (before any process starts) and returns what
`Trainer(strategy=...)` takes: Lightning's own name for DDP and friends (Lightning picks gloo on CPUs and
NCCL on GPUs), or a `deepres.strategies.DeepSpeedStrategy` whose DeepSpeed config is complete.

How the YAML maps onto the DeepSpeed config (`deepspeed_config_from_trainer`):

    trainer.strategy: deepspeed_stage_1|2|3     zero_optimization.stage = 1|2|3
    ..._2_offload / init_args.offload_optimizer zero_optimization.offload_optimizer.device = cpu
    ..._3_offload / init_args.offload_parameters zero_optimization.offload_param.device = cpu
    trainer.precision: bf16-mixed | bf16-true   bf16.enabled = true
    trainer.precision: 16-mixed | 16-true       fp16.enabled = true (dynamic loss scaling; GPUs only)
    trainer.precision: 32 | 32-true             neither (fp32)
    trainer.accumulate_grad_batches: k          gradient_accumulation_steps = k
    trainer.gradient_clip_val: c                gradient_clipping = c (by norm; 0 = off)
    data.batch_size: b (per process)            train_micro_batch_size_per_gpu = b
    init_args.config: ds.json                   the file is the base; keys it sets win, the rest is added

Activation checkpointing is deepres's own (deepres.activation_checkpoint), applied to the model before the
strategy sees it, so the DeepSpeed `activation_checkpointing` section stays Lightning's default (off).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import Accelerator, CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import DDPStrategy, Strategy, StrategyRegistry
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from typing_extensions import override

from deepres.devices import parse_devices
from deepres.errors import ConfigError
from deepres.lightning_compat import (
    auto_accelerator,
    deepspeed_available,
    is_deepspeed_checkpoint,
    unified_precision,
)
from deepres.training.checkpoints import deepspeed_checkpoint_globals, load_checkpoint

# Precisions the DeepSpeed strategy understands (Lightning's DeepSpeedPrecision).
_DEEPSPEED_PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
# The DeepSpeed op every CPU run JIT-compiles: the shared-memory all-reduce, built when DeepSpeed starts
# its process group (≈35 s on 2 cores). deepres's generated configs need no other.
CPU_OPS = ("ShareMemCommBuilder",)
# Built only if the model's optimizer is deepspeed.ops.adam.DeepSpeedCPUAdam (≈90 s on 2 cores).
CPU_ADAM_OP = "CPUAdamBuilder"


class TrainerSettings(Protocol):
    """The Trainer's keyword arguments: a dict, or the jsonargparse Namespace LightningCLI parsed."""

    def get(self, key: str, default: Any = None) -> Any: ...


class DeepSpeedStrategy(_LightningDeepSpeedStrategy):
    """Lightning's DeepSpeed strategy that also runs on CPU processes (DeepSpeed's CPU accelerator, gloo).

    On a CUDA accelerator every method defers to Lightning unchanged. On a CPU accelerator it skips
    Lightning's "only supported on CUDA GPUs" check and its device-index check (CPU devices have no
    index) and gives DeepSpeed the local rank as the device.
    """

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    @override
    def setup_environment(self) -> None:
        if not self._on_cpu():
            super().setup_environment()
            return
        use_deepspeed_cpu_accelerator()
        # The parent's parent: everything DeepSpeedStrategy.setup_environment does except its CUDA check.
        DDPStrategy.setup_environment(self)

    @override
    def setup_distributed(self) -> None:
        if not self._on_cpu():
            super().setup_distributed()
            return
        # As Lightning's, minus _validate_device_index_selection: every CPU device is `cpu`, without an index.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _deepspeed_args(self) -> argparse.Namespace:
        # DeepSpeed reads the device from args.device_rank; a CPU device has index None, which it cannot use.
        rank = self.local_rank if self._on_cpu() else self.root_device.index
        return argparse.Namespace(device_rank=rank)

    @override
    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):  # type: ignore[no-untyped-def]
        if not self._on_cpu():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        # Lightning 2.6's body with our device argument.
        model_parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=self._deepspeed_args(),
            config=self.config,
            model=model,
            model_parameters=model_parameters,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, deepspeed_optimizer

    @override
    def _initialize_deepspeed_inference(self, model: torch.nn.Module) -> None:
        if not self._on_cpu():
            super()._initialize_deepspeed_inference(model)
            return
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        # Lightning 2.6's body with our device argument.
        assert isinstance(self.config, dict)
        inference_config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}
        for key in ("fp16", "bf16"):
            if key in self.config:
                inference_config[key] = self.config[key]
        if self.zero_stage_3:
            inference_config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            inference_config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(
            args=self._deepspeed_args(),
            config=inference_config,
            model=model,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            dist_init_required=False,
        )


def use_deepspeed_cpu_accelerator() -> None:
    """Make DeepSpeed run on CPU even where it would pick CUDA (an explicit --trainer.accelerator cpu)."""
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    use_persistent_extension_cache()
    if get_accelerator().device_name() != "cpu":
        set_accelerator(CPU_Accelerator())


def extension_cache_dir() -> Path:
    """Where DeepSpeed's JIT-compiled ops live: one folder per Python and torch version, reused across runs."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepres" / "torch_extensions"
    torch_version = torch.__version__.replace("+", "_")
    return root / f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch_version}"


def use_persistent_extension_cache() -> str:
    """Point TORCH_EXTENSIONS_DIR at the deepres cache unless the user chose a folder; returns the folder.

    Set in the launching process, it is inherited by every rank, so the ≈30-90 s build happens once.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(extension_cache_dir())
    return os.environ["TORCH_EXTENSIONS_DIR"]


def build_deepspeed_ops(ops: tuple[str, ...] = CPU_OPS) -> list[str]:
    """Compile the DeepSpeed ops a CPU run needs into the persistent cache (a no-op when they are built)."""
    use_deepspeed_cpu_accelerator()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    built = []
    for name in ops:
        builder = get_accelerator().create_op_builder(name)
        if builder is None:
            raise RuntimeError(f"DeepSpeed {deepspeed.__version__} has no CPU op {name}.")
        builder.load(verbose=False)
        built.append(builder.absolute_name())
    return built


# ---------------------------------------------------------------------------------------------------------
# Trainer settings -> strategy
# ---------------------------------------------------------------------------------------------------------


def resolve_strategy(trainer: TrainerSettings, *, batch_size: int | None = None,
                     timeout: timedelta | None = None) -> str | Strategy:
    """What to pass as `Trainer(strategy=...)` for these Trainer keyword arguments, after checking them.

    `trainer` holds the Trainer's arguments as the CLI parsed them (accelerator, devices, num_nodes,
    strategy, precision, accumulate_grad_batches, gradient_clip_val, gradient_clip_algorithm,
    sync_batchnorm; missing keys take the Trainer's defaults); `batch_size` is the per-process batch;
    `timeout` how long a collective may wait for another rank (torch's default: 30 minutes).
    Raises `ConfigError` for a combination that cannot run.
    """
    strategy = _strategy_object(trainer.get("strategy", "auto"), timeout=timeout, processes=_processes(trainer))
    check_trainer_config(trainer, strategy)
    if timeout is not None and _accelerator(trainer) == "cuda":
        nccl_watchdog_environment(timeout)
    if not isinstance(strategy, _LightningDeepSpeedStrategy):
        return strategy
    assert isinstance(strategy.config, dict)
    config = deepspeed_config_from_trainer(
        strategy.config,
        precision=_precision(trainer),
        accumulate_grad_batches=int(trainer.get("accumulate_grad_batches") or 1),
        gradient_clip_val=trainer.get("gradient_clip_val"),
        micro_batch_size=batch_size,
        loss_scaling=_loss_scaling(strategy),
    )
    # Lightning writes gradient_accumulation_steps itself, from the same Trainer argument, and refuses a
    # config that already has it; everything else it keeps as given.
    config.pop("gradient_accumulation_steps")
    strategy.config = config
    use_persistent_extension_cache()
    return strategy


def deepspeed_config_from_trainer(
    base: Mapping[str, Any],
    *,
    precision: str = "32-true",
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float | None = None,
    micro_batch_size: int | None = None,
    loss_scaling: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config a run uses: `base` (the strategy's ZeRO settings or the user's JSON) plus the
    keys the Trainer's arguments imply. Keys `base` already sets are kept; `check_trainer_config` refuses
    the ones that would contradict the Trainer. Pure: returns a new dict.
    """
    config = copy.deepcopy(dict(base))
    config["gradient_accumulation_steps"] = accumulate_grad_batches
    config.setdefault("gradient_clipping", float(gradient_clip_val or 0.0))
    if micro_batch_size is not None:
        config.setdefault("train_micro_batch_size_per_gpu", micro_batch_size)
    if precision in ("16-mixed", "16-true") and "fp16" not in config:
        config["fp16"] = {"enabled": True, **_DEFAULT_LOSS_SCALING, **(loss_scaling or {})}
    if precision in ("bf16-mixed", "bf16-true") and "bf16" not in config:
        config["bf16"] = {"enabled": True}
    if "offload_optimizer" in config.get("zero_optimization", {}):
        # DeepSpeed insists on its own CPU Adam under ZeRO-Offload; the papers' SGD with momentum has no
        # DeepSpeed counterpart, so let any torch optimizer step the offloaded fp32 weights.
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


# Lightning's DeepSpeedStrategy defaults for fp16 dynamic loss scaling (loss_scale 0 = dynamic).
_DEFAULT_LOSS_SCALING = {
    "loss_scale": 0.0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}


def _loss_scaling(strategy: _LightningDeepSpeedStrategy) -> dict[str, float]:
    return {key: getattr(strategy, key) for key in _DEFAULT_LOSS_SCALING}


def lightning_deepspeed_names() -> dict[str, dict[str, Any]]:
    """Lightning's DeepSpeed strategy names (deepspeed_stage_2, ...) and the init arguments each stands for."""
    return {
        name: dict(StrategyRegistry[name]["init_params"])
        for name in StrategyRegistry.available_strategies()
        if issubclass(StrategyRegistry[name]["strategy"], _LightningDeepSpeedStrategy)
    }


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


def _processes(trainer: TrainerSettings) -> int:
    """How many processes the Trainer's arguments ask for (devices x nodes; 1 if unknown)."""
    count = parse_devices(trainer.get("devices", "auto")).count or 1  # "auto": 1 until the node says more
    return max(count, 1) * int(trainer.get("num_nodes") or 1)


def _strategy_object(strategy: str | Strategy, *, timeout: timedelta | None = None,
                     processes: int = 1) -> str | Strategy:
    """A DeepSpeed name becomes deepres's DeepSpeedStrategy with Lightning's arguments for that name; a DDP name
    (and `auto` for several processes, which Lightning would run as DDP) becomes Lightning's class with its
    registered arguments and `timeout`; strategy objects pass through unchanged."""
    if not isinstance(strategy, str):
        return strategy
    name = strategy.lower()
    deepspeed_names = lightning_deepspeed_names()
    timeout_args = {} if timeout is None else {"timeout": timeout}
    if name in deepspeed_names:
        _require_deepspeed(name)
        return DeepSpeedStrategy(**deepspeed_names[name], **timeout_args)
    if name == "auto" and processes > 1 and timeout is not None:
        return DDPStrategy(**timeout_args)
    if name in StrategyRegistry and issubclass(StrategyRegistry[name]["strategy"], DDPStrategy) and timeout_args:
        entry = StrategyRegistry[name]
        return entry["strategy"](**{**entry["init_params"], **timeout_args})
    if name != "auto" and name not in StrategyRegistry:
        raise ConfigError(
            f"--trainer.strategy {strategy!r} is not a strategy name. Use one of: auto, ddp, "
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


def _accelerator(trainer: TrainerSettings) -> str:
    """cpu, cuda, mps or tpu: what Lightning will run on for this `accelerator` argument."""
    accelerator = trainer.get("accelerator", "auto")
    if isinstance(accelerator, Accelerator):
        return {CPUAccelerator: "cpu", CUDAAccelerator: "cuda"}.get(type(accelerator), type(accelerator).__name__)
    name = str(accelerator).lower()
    if name == "auto":
        return auto_accelerator()
    if name == "gpu":
        return "cuda" if torch.cuda.is_available() else "mps"
    return name


def _precision(trainer: TrainerSettings) -> str:
    precision = trainer.get("precision")
    try:
        return str(unified_precision(precision) or "32-true")
    except ValueError as err:
        raise ConfigError(f"--trainer.precision {precision!r}: {err}") from None


def _device_indices(devices: Any) -> list[int] | None:
    """The GPU indices a `devices` argument names explicitly ([1, 3] or "1,3"), else None (a count)."""
    indices = parse_devices(devices).indices if devices is not None else None
    return list(indices) if indices is not None else None


def check_trainer_config(trainer: TrainerSettings, strategy: str | Strategy | None = None) -> None:
    """Refuse Trainer settings that cannot run, with one message naming the flags and the fix.

    Runs in the launching process, before Lightning starts any other process.
    """
    strategy = _strategy_object(trainer.get("strategy", "auto")) if strategy is None else strategy
    accelerator = _accelerator(trainer)
    precision = _precision(trainer)
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
    if on_cpu and trainer.get("sync_batchnorm"):
        raise ConfigError(
            "--trainer.sync_batchnorm true on CPU: torch's SyncBatchNorm runs on GPUs only. "
            "Drop sync_batchnorm for CPU runs (each process then normalises over its own batch)."
        )


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
    indices = _device_indices(trainer.get("devices"))
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
            "(and ZeRO-2/3 cannot be combined with pipeline parallelism). Remove the pipeline section; for "
            "depth, use activation checkpointing (model.checkpoint_every) and ZeRO-3."
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


# ---------------------------------------------------------------------------------------------------------
# deepres convert-zero
# ---------------------------------------------------------------------------------------------------------


def convert_zero_checkpoint(checkpoint_dir: str | Path, output_file: str | Path, *, trusted: bool = False) -> Path:
    """Write a ZeRO checkpoint directory (as Lightning's DeepSpeed strategy saves it) as one Lightning .ckpt
    with fp32 weights, loadable with `torch.load` or `LightningModule.load_from_checkpoint`, no DeepSpeed."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    checkpoint_dir, output_file = Path(checkpoint_dir), Path(output_file)
    if not checkpoint_dir.is_dir() or not is_deepspeed_checkpoint(checkpoint_dir):
        raise ConfigError(
            f"{checkpoint_dir} is not a DeepSpeed ZeRO checkpoint directory (one holding a `latest` file and a "
            "`checkpoint/` folder, e.g. runs/NAME/checkpoints/last.ckpt/ of a deepspeed_stage_* run)."
        )
    if output_file.is_dir():
        raise ConfigError(f"{output_file} is a directory; give the output file, e.g. {output_file / 'model.ckpt'}.")
    if not trusted:
        # DeepSpeed's converter unpickles every file with weights_only=False: check each one first with the
        # loader that cannot run code, so a crafted file is refused before DeepSpeed opens it.
        allow = deepspeed_checkpoint_globals()
        for file in sorted(checkpoint_dir.rglob("*.pt")):
            load_checkpoint(file, mmap=True, option="--trust (deepres convert-zero)", allow=allow)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_file)
    return output_file


def convert_zero_main(argv: list[str] | None = None) -> int:
    """`deepres convert-zero CKPT_DIR OUT`: a ZeRO checkpoint directory -> one plain .ckpt file."""
    parser = argparse.ArgumentParser(
        prog="deepres convert-zero",
        description="Turn a DeepSpeed ZeRO checkpoint directory into one .ckpt file with fp32 weights "
        "(torch.load(OUT)['state_dict']) that loads without DeepSpeed.",
    )
    parser.add_argument("checkpoint_dir", help="the ZeRO checkpoint directory, e.g. runs/NAME/checkpoints/last.ckpt")
    parser.add_argument("output", help="the file to write, e.g. model.ckpt")
    parser.add_argument("--trust", action="store_true",
                        help="load files that need more than tensors and plain containers (only for files you trust)")
    args = parser.parse_args(argv)
    try:
        convert_zero_checkpoint(args.checkpoint_dir, args.output, trusted=args.trust)
    except ConfigError as err:
        print(f"deepres convert-zero: {err}", file=sys.stderr)
        return 2
    return 0
