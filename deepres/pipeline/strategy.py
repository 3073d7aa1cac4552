"""`trainer.strategy: pipeline`: the net's blocks split across processes by depth (docs/pipeline.md).

    trainer:
      devices: 4
      strategy:
        class_path: deepres.strategies.PipelineStrategy
        init_args: {stages: 2, microbatches: 8, schedule: 1f1b, balance: time}

A Lightning DDP strategy (its launcher, process group, barriers) that never wraps the model in DDP.
`W` processes form a (stages × replicas) mesh: rank = stage_rank · replicas + replica. Each process keeps
its stages of `pl_module.net` (deepres.pipeline.split) and runs torch.distributed.pipelining's schedule
inside `training_step`: forward and backward of every micro-batch. Lightning zeroes the gradients
between `training_step` and `backward`, so the schedule's gradients are set aside and put back in
`backward`, where they are averaged over the stage's replicas. What the LightningModule's own
`training_step` computes from the net's output (its loss, its metrics) runs on the last stage, once per
micro-batch (that loss is what backward starts from), and once more on global rank 0 (which always holds
the first stage) on the whole batch's output sent there, with gradients off: so every logged metric is
logged where the loggers are, as a one-device run would log it.
"""

from __future__ import annotations

import contextlib
import math
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.device_mesh import init_device_mesh
from typing_extensions import override

from deepres.errors import ConfigError
from deepres.models.contract import net_of
from deepres.pipeline.runtime import SCHEDULES, Pipeline, layout_for
from deepres.pipeline.split import block_ranges, net_blocks, shared_across_stages
from deepres.pipeline.state import (
    average_gradients,
    clip_by_global_norm,
    gather_to_rank0,
    local_optimizer_state,
    merge_optimizer_states,
    merge_state_dicts,
    named_optimizer_state,
)

BALANCES = ("time", "params")


def default_microbatches(batch_size: int, stage_modules: int) -> int:
    """The smallest divisor of the per-replica batch that is at least 2 × the stage count (bubble ≤ 1/3 under
    GPipe and 1F1B), else the batch itself."""
    for m in range(2 * stage_modules, batch_size + 1):
        if batch_size % m == 0:
            return m
    return batch_size


class PipelineStrategy(DDPStrategy):
    """Pipeline parallelism over `net.blocks`, with data-parallel replicas when there are more processes than stages.

    Args:
        stages: pipeline ranks per replica (default: every process, one replica).
        microbatches: micro-batches per step and replica; must divide the per-replica batch
            (default: the smallest divisor >= 2 × the stage count).
        schedule: gpipe | 1f1b | interleaved_1f1b | zero_bubble (ZB-1P, interleaved like interleaved_1f1b).
        virtual_stages: stages per process for interleaved_1f1b and zero_bubble.
        balance: time (measured forward + backward time per block) | params | a list of blocks per stage.
    """

    strategy_name = "pipeline"

    def __init__(self, stages: int | None = None, microbatches: int | None = None, schedule: str = "1f1b",
                 virtual_stages: int = 2, balance: str | list[int] = "time", *, accelerator: Any = None,
                 parallel_devices: list[torch.device] | None = None, cluster_environment: Any = None,
                 checkpoint_io: Any = None, precision_plugin: Any = None, process_group_backend: str | None = None,
                 timeout: timedelta | None = None, start_method: str = "popen"):
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend,
                         start_method=start_method, **kwargs)
        check_options(stages, microbatches, schedule, virtual_stages, balance)
        self.stages, self.microbatches, self.schedule = stages, microbatches, schedule
        self.virtual_stages, self.balance = virtual_stages, balance
        self.batch_size: int | None = None  # per replica; from the data module, or set by resolve_strategy
        self.pipeline: Pipeline | None = None
        self._pp_group: Any = None
        self._dp_group: Any = None
        self._stash: list[tuple[torch.nn.Parameter, torch.Tensor | None]] = []
        self._full_keys: list[str] = []
        self._full_params: list[str] = []
        self._param_names: dict[int, str] = {}

    # -- the mesh ------------------------------------------------------------------------------------
    @property
    def pipeline_ranks(self) -> int:
        return self.stages or self.world_size

    @property
    def replicas(self) -> int:
        return max(self.world_size // self.pipeline_ranks, 1)

    @property
    def replica(self) -> int:
        return self.global_rank % self.replicas

    @property
    def pipeline_rank(self) -> int:
        return self.global_rank // self.replicas

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # the stages of one replica read the same batches; replicas read different ones
        return {"num_replicas": self.replicas, "rank": self.replica}

    @override
    def setup_environment(self) -> None:
        super().setup_environment()  # the process group (gloo on CPUs, NCCL on GPUs)
        if self.world_size % self.pipeline_ranks:
            raise ConfigError(_world_message(self.world_size, self.pipeline_ranks))
        mesh = init_device_mesh(self.root_device.type, (self.pipeline_ranks, self.replicas),
                                mesh_dim_names=("pp", "dp"))
        self._pp_group, self._dp_group = mesh.get_group("pp"), mesh.get_group("dp")

    # -- setup ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: Any) -> None:
        assert self.accelerator is not None and self.lightning_module is not None
        self.accelerator.setup(trainer)
        module = self.lightning_module
        if getattr(module, "ema", None) is not None:
            raise ConfigError("model.ema_decay with --trainer.strategy pipeline: the weight average would be kept per "
                              "stage and saved from rank 0 only. Leave ema_decay unset, or use --trainer.strategy ddp.")
        self.precision_plugin.convert_module(self.model)
        self._cut(trainer)
        self.model_to_device()
        assert self.pipeline is not None
        self.pipeline.start(self.root_device, self._pp_group, self._loss)
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        _clip_over_all_stages(self.precision_plugin, self)

    def _cut(self, trainer: Any) -> None:
        module = self.lightning_module
        net = net_of(module)
        if net is None or net is module:
            raise ConfigError("--trainer.strategy pipeline cuts the LightningModule's `net` at its blocks; this module "
                              "has no `net`. Keep the model as `self.net` (as deepres's modules do).")
        blocks = net_blocks(net)
        layout = layout_for(self.schedule, self.pipeline_ranks, self.virtual_stages)
        if layout.num_stages > len(blocks):
            raise ConfigError(_blocks_message(layout.num_stages, len(blocks)))
        batch = self.batch_size or getattr(trainer.datamodule, "batch_size", None)
        if self.microbatches is None:
            if batch is None:
                raise ConfigError("--trainer.strategy pipeline: set microbatches (the per-replica batch is unknown).")
            self.microbatches = default_microbatches(batch, layout.num_stages)
        if batch is not None and batch % self.microbatches:
            raise ConfigError(_microbatch_message(self.microbatches, batch))
        self.batch_size = batch
        self._full_keys = list(module.state_dict().keys())
        self._full_params = [name for name, _ in module.named_parameters()]
        ranges = None
        if self.global_rank == 0:  # one measurement, the same cut everywhere
            ranges = block_ranges(net, layout.num_stages, self.balance, sample=self._sample(module, batch))
        ranges = self.broadcast(ranges, src=0)
        shared = shared_across_stages(net, ranges)
        if shared is not None:
            raise ConfigError(f"--trainer.strategy pipeline: parameter {shared} is shared by blocks on different "
                              "stages (e.g. depth_lstm share_weights: true); shared weights cannot be cut. Use "
                              "--trainer.strategy ddp.")
        self.block_ranges = ranges
        self.pipeline = Pipeline.cut(net, ranges=ranges, layout=layout, pp_rank=self.pipeline_rank,
                                     microbatches=self.microbatches, schedule=self.schedule)
        self._param_names = {id(p): name for name, p in module.named_parameters()}
        import torchmetrics

        for m in module.modules():  # metrics sync over the replicas of the stage that logs them
            if isinstance(m, torchmetrics.Metric):
                m.process_group = self._dp_group

    def _sample(self, module: Any, batch: int | None) -> torch.Tensor | None:
        shape = getattr(module, "hparams", {}).get("input_shape")
        if self.balance != "time" or shape is None:
            return None
        rows = max((batch or 2 * (self.microbatches or 1)) // (self.microbatches or 1), 2)
        return torch.randn(rows, *shape)

    # -- a training step -----------------------------------------------------------------------------
    def _loss(self, output: Any, target: Any) -> torch.Tensor:
        """The last stage's loss for one micro-batch: the LightningModule's own training_step on the output."""
        if self.pipeline is not None and self.pipeline.evaluating:
            return output.new_zeros(())
        if self.pipeline is not None and self.pipeline.inferring:  # torch learning the gradients' shapes
            return output.float().sum() * 0.0
        with _outputs_as_forward(self.lightning_module):
            result = self.lightning_module.training_step((output, target), self._batch_idx)
        return result["loss"] if isinstance(result, dict) else result

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        assert self.pipeline is not None
        batch, batch_idx = args[0], args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
        x, y = batch[0], batch[1]
        self._check_rows(len(y))
        self._batch_idx = batch_idx
        with self.precision_plugin.train_step_context():
            out, losses = self.pipeline.train_step(x, y, measure=True)
        params = self.pipeline.parameters()
        self._stash = [(p, p.grad) for p in params]
        for p in params:
            p.grad = None
        output = self._to_rank0(out)
        if self.pipeline_rank == 0:
            with torch.no_grad(), self.precision_plugin.train_step_context(), \
                    _outputs_as_forward(self.lightning_module):
                return self.lightning_module.training_step((output, y), batch_idx)
        return torch.stack([loss.detach().float() for loss in losses]).mean() if losses else \
            torch.zeros((), device=self.root_device)

    @override
    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The schedule ran backward inside training_step; the hooks around backward run as usual.
        module = self.lightning_module
        self.pre_backward(closure_loss)
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        for p, grad in self._stash:
            p.grad = grad
        self._stash = []
        average_gradients(self.pipeline.parameters(), self._dp_group, self.replicas)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def clip_gradients_by_global_norm(self, optimizer: Any, clip_val: float) -> torch.Tensor:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return clip_by_global_norm(params, float(clip_val), self._pp_group, self.root_device)

    def _check_rows(self, rows: int) -> None:
        if self.batch_size is None:
            self.batch_size = rows
        if rows != self.batch_size or rows % self.pipeline.microbatches:
            raise ConfigError(f"--trainer.strategy pipeline got a training batch of {rows} rows; every batch must have "
                              f"{self.batch_size} rows, {self.pipeline.microbatches} micro-batches of equal size. "
                              "Drop the last incomplete batch (deepres's data modules do).")

    def _to_rank0(self, out: Any) -> Any:
        """The last stage's output, sent to pipeline rank 0 of the same replica (where global rank 0 is)."""
        assert self.pipeline is not None
        src = self.pipeline.layout.rank_of(self.pipeline.layout.num_stages - 1)
        if src == 0:
            return out
        first, last = (dist.get_global_rank(self._pp_group, r) for r in (0, src))
        if self.pipeline_rank == src:
            dist.send_object_list([(tuple(out.shape), out.dtype)], dst=first, device=self._object_device())
            dist.send(out.contiguous(), dst=first)
            return None
        if self.pipeline_rank == 0:
            meta: list[Any] = [None]
            dist.recv_object_list(meta, src=last, device=self._object_device())
            buffer = torch.empty(meta[0][0], dtype=meta[0][1], device=self.root_device)
            dist.recv(buffer, src=last)
            return buffer
        return None

    def _object_device(self) -> torch.device | None:
        return self.root_device if self.root_device.type == "cuda" else None

    # -- validation and test -------------------------------------------------------------------------
    def _evaluate(self, hook: str, batch: Any, batch_idx: int, *rest: Any) -> Any:
        assert self.pipeline is not None
        x, y = batch[0], batch[1]
        rows = len(y)
        if rows == 0:  # a batch the module skips (deepres: every sample was corrupt) is skipped on every stage
            return None
        size = self.batch_size or rows
        if rows > size:
            raise ConfigError(f"--trainer.strategy pipeline: a validation batch of {rows} rows is larger than the "
                              f"training batch ({size}); use the same data.batch_size for both.")
        if self.pipeline.has_first and rows < size:  # the stages' buffers have the training micro-batch shape
            x = torch.cat([x, x[-1:].expand(size - rows, *x.shape[1:])])
        context = getattr(self.precision_plugin, f"{'val' if hook == 'validation_step' else 'test'}_step_context")
        with context():
            out = self.pipeline.eval_step(x, y)
        output = self._to_rank0(out)
        if self.pipeline_rank != 0:
            return None
        with context(), _outputs_as_forward(self.lightning_module):
            return getattr(self.lightning_module, hook)((output[:rows], y), batch_idx, *rest)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate("validation_step", *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluate("test_step", *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        raise ConfigError("predict under --trainer.strategy pipeline is not supported: load last.ckpt (one file, "
                          "the full net) on one device and predict there.")

    # -- collectives across the mesh -----------------------------------------------------------------
    @override
    def reduce(self, tensor: Any, group: Any | None = None, reduce_op: Any = "mean") -> Any:
        # Metrics are logged by the ranks of one stage: a reduction without a group is over its replicas.
        return super().reduce(tensor, group=group if group is not None else self._dp_group, reduce_op=reduce_op)

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        flag = torch.tensor(int(decision), device=self.root_device)
        flag = super().reduce(flag, group=dist.group.WORLD, reduce_op=dist.ReduceOp.SUM)
        return bool(flag == self.world_size) if all else bool(flag)

    # -- checkpoints ---------------------------------------------------------------------------------
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The full net's state dict on global rank 0 (gathered from the first replica's stages)."""
        local = self.lightning_module.state_dict()
        if self.pipeline is None:
            return local
        parts = gather_to_rank0(local, self._pp_group, sends=self.replica == 0)
        return merge_state_dicts(parts, self._full_keys) if self.is_global_zero else {}

    @override
    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        """The one-device optimizer's state dict on global rank 0 (deepres.pipeline.state)."""
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        named = named_optimizer_state(optimizer, self._param_names)
        parts = gather_to_rank0(named, self._pp_group, sends=self.replica == 0)
        return merge_optimizer_states(parts, self._full_params) if self.is_global_zero else {}

    @override
    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        module = self.lightning_module
        local = module.state_dict().keys()
        state = {k: v for k, v in checkpoint["state_dict"].items() if k in local}
        missing = [k for k in local if k not in state]
        if strict and missing:
            raise ConfigError(f"the checkpoint lacks {len(missing)} of this stage's keys, e.g. {missing[:3]}; it is "
                              "not a checkpoint of this net.")
        module.load_state_dict(state, strict=strict and self.pipeline is None)

    @override
    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        for optimizer, full in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            optimizer.load_state_dict(local_optimizer_state(full, optimizer, self._param_names))
            for state in optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and key != "step":
                        state[key] = value.to(self.root_device)

    # -- depth diagnostics across stages (deepres.observability.diagnostics) ---------------------------------------
    def gather_depth_measurements(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float] | None:
        """Per-block arrays (NaN where a block lives elsewhere) merged over the stages, and the error-flow ratio
        from block 0's input (first stage) to the last block's output (last stage); None except on rank 0."""
        assert self.pipeline is not None
        first, last = self.pipeline.boundary_grad_squares()
        local = (arrays, None if first is None else float(first), None if last is None else float(last))
        parts = gather_to_rank0(local, self._pp_group, sends=self.replica == 0)
        if not self.is_global_zero:
            return None
        merged: dict[str, np.ndarray] = {}
        for part_arrays, _, _ in parts:
            for key, values in part_arrays.items():
                into = merged.setdefault(key, np.full(len(values), np.nan, dtype=np.float64))
                known = np.isfinite(values)
                into[known] = values[known]
        g_in = next((p[1] for p in parts if p[1] is not None), None)
        g_out = next((p[2] for p in parts if p[2] is not None), None)
        ratio = math.sqrt(g_in / g_out) if g_in is not None and g_out else math.nan
        return merged, ratio


# ---------------------------------------------------------------------------------------------------------
class _GlobalNormClipping:
    """Mixed into the Trainer's precision plugin: clipping by norm uses the norm over all stages."""

    _deepres_pipeline: PipelineStrategy

    def clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        self._deepres_pipeline.clip_gradients_by_global_norm(optimizer, clip_val)


_CLIPPING_CLASSES: dict[type, type] = {}


def _clip_over_all_stages(plugin: Any, strategy: PipelineStrategy) -> None:
    cls = type(plugin)
    if not isinstance(plugin, _GlobalNormClipping):
        if cls not in _CLIPPING_CLASSES:
            _CLIPPING_CLASSES[cls] = type(f"PipelineClipping{cls.__name__}", (_GlobalNormClipping, cls), {})
        plugin.__class__ = _CLIPPING_CLASSES[cls]
    plugin._deepres_pipeline = strategy


@contextlib.contextmanager
def _outputs_as_forward(module: Any):
    """Inside, `module(x)` returns x: the module's own step code runs on an output the pipeline computed."""
    had = "forward" in module.__dict__
    saved = module.__dict__.get("forward")
    module.forward = lambda x, *args, **kwargs: x
    try:
        yield
    finally:
        if had:
            module.forward = saved
        else:
            del module.forward


# ---------------------------------------------------------------------------------------------------------
# Checks of the options (in the launching process, before any other starts)
# ---------------------------------------------------------------------------------------------------------
def check_options(stages: int | None, microbatches: int | None, schedule: str, virtual_stages: int,
                  balance: Any) -> None:
    flag = "--trainer.strategy pipeline"
    if schedule not in SCHEDULES:
        raise ConfigError(f"{flag} schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}.")
    if stages is not None and stages < 1:
        raise ConfigError(f"{flag} stages={stages}: give at least 1 (or leave it unset: every process is a stage).")
    if microbatches is not None and microbatches < 1:
        raise ConfigError(f"{flag} microbatches={microbatches}: give at least 1.")
    if virtual_stages < 1 or (SCHEDULES[schedule].style == "loop" and virtual_stages < 2):
        raise ConfigError(f"{flag} virtual_stages={virtual_stages} with schedule {schedule}: interleaving needs at "
                          "least 2 stages per process.")
    if isinstance(balance, str) and balance not in BALANCES:
        raise ConfigError(f"{flag} balance {balance!r}: use time, params, or a list of blocks per stage.")


def _world_message(world: int, stages: int) -> str:
    return (f"--trainer.strategy pipeline with {stages} stages on {world} processes: the processes must be a multiple "
            f"of the stages (stages × replicas). Use {stages * max(world // stages, 1)} processes, or stages that "
            f"divide {world}.")


def _blocks_message(stages: int, blocks: int) -> str:
    return (f"--trainer.strategy pipeline with {stages} stages, but the net has only {blocks} blocks: every stage "
            "needs at least one block. Use fewer stages (or virtual_stages), or a deeper net.")


def _microbatch_message(microbatches: int, batch: int) -> str:
    return (f"--trainer.strategy pipeline microbatches={microbatches} does not divide the per-replica batch "
            f"--data.batch_size {batch}: micro-batches must be equal. Use a divisor of {batch} or a batch that "
            f"{microbatches} divides.")


def check_pipeline(strategy: PipelineStrategy, *, processes: int, batch_size: int | None, precision: str,
                   trainer: Any, num_blocks: int | None) -> None:
    """Refuse what cannot run, before any process starts: one message each."""
    flag = "--trainer.strategy pipeline"
    stages = strategy.stages or processes
    if processes % stages:
        raise ConfigError(_world_message(processes, stages))
    layout = layout_for(strategy.schedule, stages, strategy.virtual_stages)
    if num_blocks is not None and layout.num_stages > num_blocks:
        raise ConfigError(_blocks_message(layout.num_stages, num_blocks))
    micro = strategy.microbatches
    if batch_size is not None:
        if micro is not None and batch_size % micro:
            raise ConfigError(_microbatch_message(micro, batch_size))
        micro = micro or default_microbatches(batch_size, layout.num_stages)
    if micro is not None and strategy.schedule != "gpipe" and micro < layout.ranks:
        raise ConfigError(f"{flag} schedule {strategy.schedule} with {micro} micro-batches on {layout.ranks} stages: "
                          "1F1B-type schedules need at least one micro-batch per stage. Raise microbatches or use "
                          "schedule gpipe.")
    if micro is not None and layout.per_rank > 1 and micro % layout.ranks:
        raise ConfigError(f"{flag} schedule {strategy.schedule}: microbatches={micro} must be a multiple of the "
                          f"{layout.ranks} pipeline ranks.")
    if precision in ("16-mixed", "16-true"):
        raise ConfigError(f"{flag} with --trainer.precision {precision}: float16 needs a loss scaler around the "
                          "schedule's own backward, which deepres does not run. Use --trainer.precision bf16-mixed.")
    if int(trainer.get("accumulate_grad_batches") or 1) > 1:
        raise ConfigError(f"{flag} with --trainer.accumulate_grad_batches > 1: micro-batches are gradient "
                          "accumulation already. Raise data.batch_size and microbatches by the same factor instead.")
    if trainer.get("sync_batchnorm"):
        raise ConfigError(f"{flag} with --trainer.sync_batchnorm: BatchNorm normalises each micro-batch "
                          "(docs/pipeline.md#batchnorm-under-micro-batches). Drop sync_batchnorm.")


StrategyRegistry.register("pipeline", PipelineStrategy, description="deepres pipeline parallelism over net.blocks",
                          override=True)
