"""DeepSpeed ZeRO 1-3 under Lightning, also on CPU processes, its config from the Trainer's arguments, and
`deepres convert-zero`.

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

Activation checkpointing is deepres's own (deepres.parallelize.activation_checkpoint), applied to the model before the
strategy sees it, so the DeepSpeed `activation_checkpointing` section stays Lightning's default (off).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeedStrategy
from typing_extensions import override

from deepres.models.cpu_kernels import extension_cache_dir, use_persistent_extension_cache  # noqa: F401 (re-exported)

# The DeepSpeed op every CPU run JIT-compiles: the shared-memory all-reduce, built when DeepSpeed starts
# its process group (≈35 s on 2 cores). deepres's generated configs need no other.
CPU_OPS = ("ShareMemCommBuilder",)
# Built only if the model's optimizer is deepspeed.ops.adam.DeepSpeedCPUAdam (≈90 s on 2 cores).
CPU_ADAM_OP = "CPUAdamBuilder"



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


def loss_scaling(strategy: _LightningDeepSpeedStrategy) -> dict[str, float]:
    return {key: getattr(strategy, key) for key in _DEFAULT_LOSS_SCALING}


def lightning_deepspeed_names() -> dict[str, dict[str, Any]]:
    """Lightning's DeepSpeed strategy names (deepspeed_stage_2, ...) and the init arguments each stands for."""
    return {
        name: dict(StrategyRegistry[name]["init_params"])
        for name in StrategyRegistry.available_strategies()
        if issubclass(StrategyRegistry[name]["strategy"], _LightningDeepSpeedStrategy)
    }
