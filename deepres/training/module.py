"""Lightning modules: image/vector classification and sequence tasks over any registry model.

The network itself is a plain single-device `nn.Module` from `deepres.models.create_model`, held
as `self.net`; everything distributed or compiled is applied to it from outside
(`configure_model` → deepres.parallelize, then the strategy).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.utilities import rank_zero_info

from deepres.data.sequence import ADDING_TOLERANCE
from deepres.errors import ConfigError
from deepres.lightning_compat import should_update_logs
from deepres.models import create_model, model_arguments
from deepres.models.pretrained import load_weights_file
from deepres.parallelize import parallelize
from deepres.training import stop_signals
from deepres.training.config import MemoryConfig, OptimizerConfig, ScheduleConfig, as_hparams, coerce
from deepres.training.ema import WeightEMA
from deepres.training.optim import build_optimizer, fused_allowed, lr_lambda


class DeepresModule(L.LightningModule):
    """Shared by every task: building the net, optimiser and schedule, parallelisation.

    Subclasses take the hyper-parameter groups of deepres.training.config (`optim`, `schedule`,
    `memory`) as keyword arguments and save their own arguments with `_save_hparams(locals())`.
    """

    def __init__(
        self,
        *,
        arch: str,
        arch_args: dict[str, Any] | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (64,),
        optim: OptimizerConfig | None = None,
        schedule: ScheduleConfig | None = None,
        memory: MemoryConfig | None = None,
    ):
        super().__init__()
        self.optim = coerce(OptimizerConfig, optim, flag="model.optim")
        self.schedule = coerce(ScheduleConfig, schedule, flag="model.schedule")
        self.memory = coerce(MemoryConfig, memory, flag="model.memory")
        self.net = create_model(arch, **self._net_overrides(arch, arch_args or {}, num_classes, input_shape))
        self._parallelized = False
        self._horizon: int | None = None  # optimizer steps of the whole run, for the schedule

    def _save_hparams(self, init_locals: dict[str, Any]) -> None:
        """Save a subclass's `__init__` arguments (pass `locals()` as its first statement) as
        hyper-parameters, with the groups as plain dicts: checkpoints then hold only built-in types
        (they load with weights_only=True) and loggers show `optim.lr`-style keys."""
        self.save_hyperparameters(
            {k: as_hparams(v) for k, v in init_locals.items() if k not in ("self", "__class__")})

    def _net_overrides(self, arch: str, args: dict, num_classes: int, input_shape: tuple[int, ...]) -> dict:
        accepted = model_arguments(arch)
        io = {}
        for key, value in (
            ("in_features", math.prod(input_shape)),
            ("in_chans", input_shape[0]),
            ("input_size", input_shape[-1]),
            ("num_classes", num_classes),
            ("output_size", max(num_classes, 1)),  # 0 classes = one regression output
        ):
            if key in accepted and key not in args:
                io[key] = value
        return {**io, **args}

    def configure_model(self) -> None:
        if self._parallelized:
            return
        auto = {}
        if self.memory.activation_checkpointing == "auto":
            # measured on random samples of the data's shape, on the training device, at the per-device batch
            device = self.trainer.strategy.root_device
            self.net.to(device)
            auto = dict(memory_budget_gb=self.memory.memory_budget_gb,
                        example_input=torch.randn(8, *self.hparams["input_shape"], device=device),
                        batch_size=int(getattr(self.trainer.datamodule, "batch_size", 8) or 8))
        self.memory_decision: dict = {}  # what ran, for the run plan (deepres.training.plan)
        parallelize(self.net, activation_checkpointing=self.memory.activation_checkpointing,
                    compile=self.memory.compile, channels_last=self.memory.channels_last,
                    decision=self.memory_decision, **auto)
        self._parallelized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def logs_this_step(self) -> bool:
        """Whether Lightning writes step-level logs after this training step (every
        `trainer.log_every_n_steps`, and on the last step). Step metrics are computed only then: a
        torchmetrics update and three `self.log` calls on every step cost ~5 % of a small model's step,
        for values no logger ever sees (Lightning keeps only the step it writes)."""
        if self._trainer is None:
            return True
        return should_update_logs(self._trainer)  # Lightning's own test, not copied

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._last_loss = loss.detach()  # no .item(): read once, at the end (no sync per step)

    @property
    def last_train_loss(self) -> float | None:
        """The loss of the newest training step (for runs that end before their first logged step)."""
        loss = getattr(self, "_last_loss", None)
        return None if loss is None else float(loss)

    def on_train_end(self) -> None:
        # A run shorter than trainer.log_every_n_steps logs no training row: record its final loss anyway,
        # in metrics.csv and wandb (rank 0: the loggers write on rank 0 only) and in finished.json.
        # Not when a stop signal ended it: the run resumes, and a row here would be one the run in one go lacks.
        trainer = self.trainer
        stopped = stop_signals.stopped_training(trainer)
        if "train/loss" in trainer.callback_metrics or self.last_train_loss is None or stopped:
            return
        trainer.callback_metrics["train/loss"] = self._last_loss.float().cpu()
        for logger in trainer.loggers:
            logger.log_metrics({"train/loss": self.last_train_loss}, step=max(trainer.global_step - 1, 0))
            logger.save()

    def configure_optimizers(self):
        trainer = self.trainer
        opt = build_optimizer(self.net, self.optim, fused=fused_allowed(
            precision=str(trainer.precision), gradient_clip_val=trainer.gradient_clip_val))
        # The horizon is read when the schedule first needs it (after the first step past the warm-up), not
        # here: `estimated_stepping_batches` builds the training loader if none is built yet, and here that is
        # before Lightning restores a checkpoint's loop position. Lightning keeps that loader, so a run resumed
        # inside an epoch would train on the epoch's batches from the first again (deepres.data.base skips the
        # trained ones only when the loader is built after the position is restored).
        factor = lr_lambda(self.schedule, total_steps=self._schedule_horizon)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _schedule_horizon(self) -> int:
        """The optimizer steps the whole run will take (Lightning's estimate: batches per epoch over the
        accumulation, times max_epochs, capped by max_steps), fixed at its first use."""
        if self._horizon is None:
            steps = self.trainer.estimated_stepping_batches
            if steps == float("inf"):
                raise ConfigError(f"model.schedule.name={self.schedule.name!r} needs the run's length: set "
                                  "trainer.max_steps or trainer.max_epochs (or use the constant schedule).")
            self._horizon = int(steps)
        return self._horizon


class Classifier(DeepresModule):
    """Image or vector classification with cross-entropy, top-1/top-5 accuracy."""

    def __init__(
        self,
        *,
        arch: str = "highway_mlp",
        depth: int | None = None,
        width: int | None = None,
        gate: str | None = None,
        gate_bias: float | str | None = None,
        activation: str | None = None,
        init: str | None = None,
        norm: str | None = None,
        drop_path: float | None = None,
        reversible: bool | None = None,
        streams: int | None = None,
        depth_scaling: str | None = None,
        arch_args: dict[str, Any] | None = None,
        num_classes: int = 10,
        input_shape: tuple[int, ...] = (64,),
        optim: OptimizerConfig = OptimizerConfig(),
        schedule: ScheduleConfig = ScheduleConfig(),
        memory: MemoryConfig = MemoryConfig(),
        label_smoothing: float = 0.0,
        init_from: str | None = None,
        ema_decay: float | None = None,
    ):
        """
        Args:
            arch: a name from deepres.models.list_models() (e.g. highway_mlp, resnet50, resnet110_cifar).
            depth: depth override (highway_mlp: hidden layers; CIFAR ResNets: 6n+2; PreAct: 9n+2).
            width: width override (highway_mlp units per layer).
            gate: plain | residual | highway | gated; hc | mhc | mhc_lite (multi-stream: highway_mlp,
                highway_cnn_cifar).
            gate_bias: transform gate bias, or "auto" (= −ln(L) − 1 for L blocks).
            activation: activation of dense layers (relu, tanh, …).
            init: initialisation preset of the blocks (default, fixup, rezero, skipinit, layerscale,
                deepnorm; orthogonal and delta_orthogonal for plain nets), where the architecture has it.
            norm: normalisation of conv bodies (batch, group, layer, none), where the architecture has it.
            drop_path: stochastic depth, the drop rate of the last block (linear in the block index).
            reversible: reversible blocks (inputs recomputed from outputs in backward), where the
                architecture has them.
            streams: residual streams of the multi-stream gates (hc, mhc, mhc_lite; default 4).
            depth_scaling: none | completep: each block's change × 1/L with per-group learning rates, weight
                decays and Adam ε for the blocks' parameters, so that one lr holds at every depth
                (deepres.models.depth_scaling), where the architecture has it.
            arch_args: any other argument of the architecture (e.g. {layers: [3, 24, 36, 3]}).
            num_classes: classes; linked from the data module.
            input_shape: one sample's shape; linked from the data module.
            optim: the optimizer: name, lr, momentum, nesterov, betas, weight_decay.
            schedule: the learning-rate schedule: name, warmup_steps, milestones, gamma, min_lr_ratio.
            memory: how the net runs: activation_checkpointing (k, sqrt, all, selective, auto), compile,
                channels_last, memory_budget_gb (for auto).
            label_smoothing: cross-entropy label smoothing.
            init_from: start from these weights: a torchvision or timm ResNet state dict (.pth,
                .safetensors; loaded by name, gates left at init, the head too if the class count
                differs) or a deepres checkpoint (deepres.models.pretrained.load_weights_file).
            ema_decay: keep an exponential moving average of the weights with this decay (e.g. 0.9999),
                validate with it and save it in checkpoints (deepres.training.ema); unset = off.
        """
        self_args = dict(locals())  # first: the arguments as given
        shortcuts = dict(depth=depth, width=width, gate=gate, gate_bias=gate_bias, activation=activation,
                         init=init, norm=norm, drop_path=drop_path, reversible=reversible, streams=streams,
                         depth_scaling=depth_scaling)
        arch_args = {**(arch_args or {}), **{k: v for k, v in shortcuts.items() if v is not None}}
        super().__init__(arch=arch, arch_args=arch_args, num_classes=num_classes, input_shape=input_shape,
                         optim=optim, schedule=schedule, memory=memory)
        self._save_hparams(self_args)
        if init_from:
            rank_zero_info(f"deepres: model.init_from {init_from}: {load_weights_file(self.net, init_from)}")
        self.label_smoothing = label_smoothing
        self.ema = WeightEMA(ema_decay) if ema_decay is not None else None
        top5 = min(5, num_classes)
        self.train_acc1 = torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc1 = torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = torchmetrics.classification.MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    def configure_callbacks(self):
        return [self.ema] if self.ema is not None else []

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        # y: class indices, or (B, K) class probabilities from MixUp/CutMix (deepres.data.recipes)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        if self.logs_this_step():
            self.train_acc1(logits, y if y.ndim == 1 else y.argmax(1))
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/acc1", self.train_acc1, prog_bar=True)
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if len(y) == 0:  # a shard batch whose samples were all corrupt: nothing to score
            return
        logits = self(x)
        self.val_acc1(logits, y)
        self.val_acc5(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc1", self.val_acc1, prog_bar=True)
        self.log(f"val/acc{self.val_acc5.top_k}", self.val_acc5)

    test_step = validation_step


class SequenceModule(DeepresModule):
    """Sequence regression (adding problem) or classification (temporal order) with the loss and
    the success criterion at the sequence end, as in Hochreiter & Schmidhuber 1997."""

    def __init__(
        self,
        *,
        arch: str = "lstm",
        cell: str = "1999",
        hidden_size: int = 64,
        num_layers: int = 1,
        forget_bias: float | Literal["auto"] = 1.0,
        input_bias: float | Literal["auto"] | None = None,
        num_classes: int = 0,
        input_shape: tuple[int, ...] = (100, 2),
        optim: OptimizerConfig = OptimizerConfig(name="adam", lr=1e-3, nesterov=False),
        schedule: ScheduleConfig = ScheduleConfig(name="constant"),
        memory: MemoryConfig = MemoryConfig(),
        tolerance: float = ADDING_TOLERANCE,
        time_checkpoint: int | Literal["sqrt"] = 0,
    ):
        """
        Args:
            arch: lstm (unfolded over time).
            cell: "1997" (no forget gate), "1999" (forget gate, opened by `forget_bias`), "rnn" (plain tanh RNN).
            hidden_size: units per layer.
            num_layers: stacked recurrent layers.
            forget_bias: initial forget-gate bias of the 1999 cell: a number (Gers et al. 1999 and
                Jozefowicz et al. 2015: +1), or "auto" = ln(T) + 1 for sequences of T steps. Unfolded over
                T steps the cell state is a T-block residual stream with the forget gate as its carry
                gate; +1 keeps σ(1)^T of it (2e-14 at T = 100), "auto" keeps about e^(-1/e) ≈ 0.69,
                the same rule as the carry bias of `gated` blocks
                (docs/science.md#the-lstm-cell-state-is-a-residual-stream).
            input_bias: initial input-gate bias of the LSTM cells: None (PyTorch's default, ≈ 0), a number,
                or "auto" = −ln(T): the gates start closed so that the cell state sums about one input
                over T steps instead of drifting into tanh's saturation (Hochreiter & Schmidhuber 1997
                start their input gates closed for the same reason).
            num_classes: 0 for regression, else classes; linked from the data module.
            input_shape: (T, features); linked from the data module.
            optim: the optimizer (default Adam, lr 1e-3): name, lr, momentum, nesterov, betas, weight_decay.
            schedule: the learning-rate schedule (default constant): name, warmup_steps, milestones, gamma,
                min_lr_ratio.
            memory: how the net runs: activation_checkpointing (over the stacked layers), compile.
            tolerance: regression success criterion, |prediction − target| < tolerance (1997 paper: 0.04).
            time_checkpoint: keep the recurrent state only every k time steps and recompute in backward
                (0: off, k, or "sqrt" ≈ √T): O(√T) activation memory for about one extra forward pass.
        """
        self_args = dict(locals())  # first: the arguments as given
        if forget_bias == "auto":
            forget_bias = math.log(input_shape[0]) + 1
        elif isinstance(forget_bias, str):
            raise ConfigError(f"model.forget_bias={forget_bias!r}: give a number or 'auto' (= ln(T) + 1).")
        if input_bias == "auto":
            input_bias = -math.log(input_shape[0])
        elif isinstance(input_bias, str):
            raise ConfigError(f"model.input_bias={input_bias!r}: give a number, 'auto' (= −ln(T)) or null.")
        arch_args = {"cell": cell, "hidden_size": hidden_size, "num_layers": num_layers, "forget_bias": forget_bias,
                     **({"time_checkpoint": time_checkpoint} if time_checkpoint else {}),
                     **({"input_bias": input_bias} if input_bias is not None else {})}
        super().__init__(arch=arch, arch_args=arch_args, num_classes=num_classes, input_shape=input_shape,
                         optim=optim, schedule=schedule, memory=memory)
        self._save_hparams(self_args)
        self.regression = num_classes == 0
        self.tolerance = tolerance
        self.val_success = torchmetrics.MeanMetric()
        self.train_success = torchmetrics.MeanMetric()

    def _step(self, batch):
        x, y = batch
        out = self(x)
        if self.regression:
            loss = F.mse_loss(out, y)
            success = ((out - y).abs() < self.tolerance).all(dim=1).float()
        else:
            loss = F.cross_entropy(out, y)
            success = (out.argmax(dim=1) == y).float()
        return loss, success

    def training_step(self, batch, batch_idx):
        loss, success = self._step(batch)
        if self.logs_this_step():
            self.train_success(success)
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/success_rate", self.train_success)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, success = self._step(batch)
        self.val_success(success)
        self.log("val/loss", loss, sync_dist=True)
        self.log("val/success_rate", self.val_success, prog_bar=True)

    test_step = validation_step
