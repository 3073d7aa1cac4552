"""The run plan: every setting of a `deepres fit` run resolved, checked and shown once.

`build_plan(config)` reads the parsed command line and YAML (LightningCLI's namespace for the subcommand)
before any class is instantiated, any process started, any directory made or wandb touched. Every rule
that joins two options lives here or in the checks it calls (deepres.strategies.check_trainer_config), so a
combination that cannot run is refused in one line, naming the options and the fix, before anything is
written.

During the run the plan is completed with what only the built objects know (the parameter count, the
pipeline's cut, the memory setting `auto` chose and its predicted peak), shown at the start as a short block
(`RunPlan.lines`) and kept as `plan.json` in the run directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from deepres.errors import ConfigError
from deepres.files import atomic_write_bytes
from deepres.training.key_suggestions import close

MemoryMode = Literal["none", "every", "sqrt", "all", "selective", "auto", "reversible"]
MEMORY_SETTINGS = ("0", "none", "K (an integer >= 1)", "sqrt", "all", "selective", "selective:K", "selective:sqrt",
                   "auto")
_NAMED = ("none", "sqrt", "all", "selective", "auto")


def _suggestion(value: Any) -> str:
    near = close(str(value), _NAMED, n=1)
    return f" Did you mean {near[0]!r}?" if near else ""


# ------------------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class MemoryPlan:
    """How the net's activations are kept: `model.memory` (and `reversible`), parsed once into types.

    mode: none | every (checkpoint every `every` blocks) | sqrt | all | selective (keep matmul and conv outputs,
    recompute the rest, in segments of `every` blocks, or √L with `every` None) | auto (measured against
    `budget_gb` on the training device, decided in `configure_model`) | reversible (inputs rebuilt from outputs).
    """

    mode: MemoryMode = "none"
    every: int | str | None = None
    budget_gb: float | None = None
    compile: bool = False
    channels_last: bool = False
    # filled in once the net is built: the setting auto chose, the segment length, the predicted peak
    chosen: str | None = None
    segment: int | None = None
    predicted_peak_gb: float | None = None

    @classmethod
    def parse(cls, memory: Any, *, reversible: bool = False) -> MemoryPlan:
        """From `model.memory` (a MemoryConfig, a namespace or a dict). Raises ConfigError naming the option."""
        get = memory.get if hasattr(memory, "get") else lambda k, d=None: getattr(memory, k, d)
        setting = get("activation_checkpointing", 0)
        budget = get("memory_budget_gb")
        extra = dict(budget_gb=budget, compile=bool(get("compile", False)),
                     channels_last=bool(get("channels_last", False)))
        flag = "--model.memory.activation_checkpointing"
        if isinstance(setting, str) and setting.strip().isdigit():
            setting = int(setting)
        if isinstance(setting, bool) or (isinstance(setting, int) and setting < 0):
            raise ConfigError(f"{flag} {setting!r}: give an integer >= 1 (checkpoint every K blocks), or one of "
                              f"{', '.join(MEMORY_SETTINGS)}; 0 turns it off.")
        if setting in (0, None, "none"):
            plan = cls("none", **extra)
        elif isinstance(setting, int):
            plan = cls("every", every=setting, **extra)
        elif setting in ("sqrt", "all"):
            plan = cls(setting, **extra)
        elif setting == "auto":
            if budget is None or budget <= 0:
                raise ConfigError(f"{flag} auto chooses the cheapest setting whose measured peak fits a budget: give "
                                  "--model.memory.memory_budget_gb (GB one training step may use beyond parameters "
                                  "and optimizer state), e.g. --model.memory.memory_budget_gb 8.")
            plan = cls("auto", **extra)
        elif isinstance(setting, str) and setting.split(":", 1)[0] == "selective":
            rest = setting.partition(":")[2]
            if ":" in setting and not (rest.isdigit() and int(rest) >= 1 or rest in ("sqrt", "all")):
                raise ConfigError(f"{flag} {setting!r}: write selective, or selective:K with K an integer >= 1, "
                                  "sqrt or all.")
            plan = cls("selective", every=int(rest) if rest.isdigit() else (rest or 1), **extra)
        else:
            raise ConfigError(f"{flag} {setting!r} is not a setting.{_suggestion(setting)} Settings: "
                              f"{', '.join(MEMORY_SETTINGS)}.")
        if budget is not None and plan.mode != "auto":
            raise ConfigError(f"--model.memory.memory_budget_gb {budget} is read only by {flag} auto. Set "
                              f"activation_checkpointing to auto, or drop memory_budget_gb.")
        if plan.mode == "selective" and plan.compile:
            raise ConfigError(
                f"{flag} {setting} with --model.memory.compile true: torch.compile cannot trace the hooks that choose what "
                "selective checkpointing keeps (a guard on their per-thread state fails). Use compile with none, K, "
                "sqrt or all, or selective without compile.")
        if reversible:
            if plan.mode != "none":
                raise ConfigError(
                    f"--model.reversible true with {flag} {setting}: a reversible stack stores no activations inside "
                    f"its reversible runs, so checkpointing has nothing to save there. Use one of the two.")
            plan = replace(plan, mode="reversible")
        return plan

    def describe(self) -> str:
        if self.mode == "none":
            text = "activations kept (no checkpointing)"
        elif self.mode == "reversible":
            text = "reversible blocks (activations rebuilt from outputs in backward)"
        elif self.mode == "auto":
            text = f"auto within {self.budget_gb:g} GB"
            if self.chosen is not None:
                text += f": chose {self.chosen}"
        elif self.mode == "selective":
            text = f"selective checkpointing, segments of {self.every}"
        elif self.mode == "every":
            text = f"checkpoint every {self.every} blocks"
        else:
            text = f"checkpointing {self.mode}"
        if self.segment:
            text += f" (k = {self.segment})"
        if self.predicted_peak_gb is not None:
            text += f", predicted step peak {self.predicted_peak_gb:.3g} GB"
        return text + (", compiled blocks" if self.compile else "") + (", channels_last" if self.channels_last else "")


# ------------------------------------------------------------------------------------------------ trainer
@dataclass(frozen=True)
class TrainerPlan:
    """The Trainer's settings that decide what runs where, read once."""

    processes: int = 1
    nodes: int = 1
    accelerator: str = "cpu"
    precision: str = "32-true"
    strategy: str = "single process"
    zero_stage: int | None = None
    gradient_clip_val: float | None = None
    accumulate_grad_batches: int = 1
    max_epochs: int | None = None
    max_steps: int = -1
    log_every_n_steps: int = 50
    fused_optimizer: bool = True
    pipeline: dict[str, Any] | None = None  # stages, schedule, micro_batches, cut: filled in when cut

    def describe(self) -> list[str]:
        where = f"{self.processes} process{'es' if self.processes != 1 else ''} on {self.accelerator}"
        where += f" ({self.nodes} nodes)" if self.nodes > 1 else ""
        strategy = self.strategy + (f" (ZeRO stage {self.zero_stage})" if self.zero_stage is not None else "")
        if self.pipeline:
            p = self.pipeline
            strategy = (f"pipeline: {p.get('stages')} stages, schedule {p.get('schedule')}, "
                        f"{p.get('micro_batches')} micro-batches" + (f", cut {p['cut']}" if p.get("cut") else ""))
        clip = f"clip {self.gradient_clip_val:g}" if self.gradient_clip_val else "no clipping"
        stop = (f"{self.max_epochs} epochs" if self.max_epochs not in (None, -1) else "") + (
            f"{', ' if self.max_epochs not in (None, -1) else ''}max {self.max_steps} steps"
            if self.max_steps not in (None, -1) else "")
        optimizer = "fused optimizer" if self.fused_optimizer else "unfused optimizer (clipping under mixed precision)"
        return [f"strategy  {strategy}, {where}",
                f"precision {self.precision}, {clip}, accumulate {self.accumulate_grad_batches}, {optimizer}",
                f"schedule  {stop or 'until stopped'}, logs every {self.log_every_n_steps} steps"]


def trainer_plan(trainer: Any) -> TrainerPlan:
    """From the Trainer's arguments (a dict or the parsed namespace): the one reading of them. Checks the
    strategy combination (deepres.strategies.check_trainer_config) with what is known before the net exists."""
    from deepres.strategies import check_trainer_config
    from deepres.strategies.settings import accelerator_name, precision_name, processes
    from deepres.training.optim import fused_allowed

    get = trainer.get
    check_trainer_config(trainer)
    precision = precision_name(trainer)
    strategy = get("strategy", "auto")
    name = _strategy_name(strategy)
    stage = None
    if isinstance(strategy, str) and strategy.startswith("deepspeed_stage_"):
        stage = int(strategy.removeprefix("deepspeed_stage_")[0])
    count = processes(trainer)
    if name == "auto":
        name = "DDP" if count > 1 else "single process"
    for key, minimum in (("max_epochs", -1), ("max_steps", -1), ("accumulate_grad_batches", 1),
                         ("log_every_n_steps", 1)):
        value = get(key)
        if value is not None and (not isinstance(value, int) or value < minimum):
            raise ConfigError(f"--trainer.{key} {value!r}: give an integer >= {minimum}"
                              f"{' (-1: no limit)' if minimum == -1 else ''}.")
    clip = get("gradient_clip_val")
    pipeline = {} if name == "pipeline" else None  # its stages, schedule and cut are known once it has cut the net
    return TrainerPlan(
        processes=count, nodes=int(get("num_nodes") or 1), accelerator=accelerator_name(trainer), precision=precision,
        strategy=name, zero_stage=stage, gradient_clip_val=float(clip) if clip else None,
        accumulate_grad_batches=int(get("accumulate_grad_batches") or 1), max_epochs=get("max_epochs"),
        max_steps=int(get("max_steps") if get("max_steps") is not None else -1),
        log_every_n_steps=int(get("log_every_n_steps") or 50),
        fused_optimizer=fused_allowed(precision=precision, gradient_clip_val=clip), pipeline=pipeline,
    )


def _strategy_name(strategy: Any) -> str:
    """`pipeline`, a DeepSpeed or DDP name, or a class name, for a strategy given as a name, a YAML class_path
    or an object."""
    if isinstance(strategy, str):
        return strategy
    class_path = strategy.get("class_path") if hasattr(strategy, "get") else None
    cls = str(class_path).rsplit(".", 1)[-1] if class_path else type(strategy).__name__
    return "pipeline" if cls == "PipelineStrategy" else cls


# ------------------------------------------------------------------------------------------------ model, data
BLOCK_OPTIONS = ("depth", "width", "gate", "gate_bias", "activation", "init", "norm", "drop_path", "reversible",
                 "depth_scaling")


@dataclass(frozen=True)
class ModelPlan:
    module: str
    arch: str | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the block options in effect (defaults filled in)
    parameters: int | None = None
    blocks: int | None = None

    def describe(self) -> str:
        shown = ", ".join(f"{k} {v}" for k, v in self.options.items() if v is not None)
        size = f"; {self.parameters:,} parameters" if self.parameters is not None else ""
        size += f" in {self.blocks} blocks" if self.blocks is not None else ""
        return f"model     {self.arch or self.module}" + (f": {shown}" if shown else "") + size


def effective_model_options(init_args: Any) -> dict[str, Any]:
    """The block options as the net will be built: the given ones, and the architecture's defaults for the
    ones left unset (`depth: null` means the architecture's own depth, e.g. 100 for highway_mlp)."""
    import inspect

    from deepres.models.registry import _lookup

    get = init_args.get if hasattr(init_args, "get") else lambda k, d=None: getattr(init_args, k, d)
    arch = get("arch")
    if not arch:
        return {}
    params = inspect.signature(_lookup(arch)).parameters
    arch_args = dict(get("arch_args") or {})
    options = {}
    for key in BLOCK_OPTIONS:
        value = get(key)
        if value is None:
            value = arch_args.get(key)
        if value is None and key in params and params[key].default is not inspect.Parameter.empty:
            value = params[key].default
        if value is not None and key in params:
            options[key] = value
    return options


@dataclass(frozen=True)
class DataPlan:
    module: str
    batch_size: int | None = None
    train_size: int | None = None
    workers: int | None = None

    def describe(self) -> str:
        parts = [f"batch {self.batch_size}" if self.batch_size is not None else None,
                 f"{self.train_size} training samples" if self.train_size is not None else None,
                 f"{self.workers} loader workers" if self.workers else None]
        return f"data      {self.module}" + ("".join(f", {p}" for p in parts if p)).replace(", ", ": ", 1)


# ------------------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class RunPlan:
    model: ModelPlan
    memory: MemoryPlan
    trainer: TrainerPlan
    data: DataPlan
    seed: int | None = None
    run_dir: str | None = None

    def lines(self) -> list[str]:
        """What will run, in at most 15 lines (the start of the run's log)."""
        lines = ["deepres run plan", "  " + self.model.describe(), f"  memory    {self.memory.describe()}"]
        lines += ["  " + line for line in self.trainer.describe()]
        lines += ["  " + self.data.describe(), f"  seed      {self.seed}"]
        if self.run_dir:
            lines.append(f"  outputs   {self.run_dir}  (plan.json, config.yaml, metrics.csv, checkpoints/)")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / "plan.json"
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2, default=str) + "\n").encode())
        return path


def _section(config: Any, name: str) -> tuple[str, Any]:
    section = config.get(name) if hasattr(config, "get") else None
    if section is None:
        return "", {}
    class_path = section.get("class_path", "") if hasattr(section, "get") else ""
    init_args = section.get("init_args", {}) if hasattr(section, "get") else {}
    return str(class_path), init_args or {}


def build_plan(config: Any) -> RunPlan:
    """The plan of the subcommand's parsed configuration (LightningCLI's `config[subcommand]`). Raises
    ConfigError for any value or combination that cannot run; writes nothing."""
    model_class, model_args = _section(config, "model")
    data_class, data_args = _section(config, "data")
    mget = model_args.get if hasattr(model_args, "get") else lambda k, d=None: d
    dget = data_args.get if hasattr(data_args, "get") else lambda k, d=None: d
    reversible = bool(mget("reversible") or (mget("arch_args") or {}).get("reversible"))
    memory = MemoryPlan.parse(mget("memory") or {}, reversible=reversible)
    trainer = trainer_plan(config.get("trainer") or {})
    batch_size = dget("batch_size")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigError(f"--data.batch_size {batch_size!r}: give an integer >= 1 (samples per process and step).")
    options = effective_model_options(model_args) if mget("arch") else {}
    drop_path = options.get("drop_path")
    if drop_path is not None and not (0.0 <= float(drop_path) < 1.0):
        raise ConfigError(f"--model.drop_path {drop_path}: the drop rate of the last block must be in [0, 1).")
    if memory.mode == "selective" and trainer.zero_stage == 3:
        raise ConfigError(
            "--model.memory.activation_checkpointing selective with ZeRO stage 3: ZeRO-3 gathers each parameter anew "
            "inside the recomputation, which selective checkpointing's cache of saved outputs cannot match. Use "
            "none, K, sqrt or all with deepspeed_stage_3, or selective with deepspeed_stage_1/2 or ddp.")
    if trainer.zero_stage == 3 and mget("ema_decay") is not None:
        raise ConfigError("--model.ema_decay with ZeRO stage 3: the stage shards the weights across ranks, so no rank "
                          "holds the whole average. Use DDP or ZeRO stage 1/2, or leave ema_decay unset.")
    if trainer.pipeline is not None and mget("ema_decay") is not None:
        raise ConfigError("--model.ema_decay with --trainer.strategy pipeline: the weight average would be kept per "
                          "stage and saved from rank 0 only. Leave ema_decay unset, or use --trainer.strategy ddp.")
    model = ModelPlan(module=model_class.rsplit(".", 1)[-1], arch=mget("arch"), options=options)
    data = DataPlan(module=data_class.rsplit(".", 1)[-1], batch_size=batch_size, train_size=dget("train_size"),
                    workers=dget("num_workers"))
    return RunPlan(model=model, memory=memory, trainer=trainer, data=data, seed=config.get("seed_everything"))


# ------------------------------------------------------------------------------------------------ shown and kept
def completed(plan: RunPlan, trainer: Any, pl_module: Any) -> RunPlan:
    """The plan with what only the built run knows: parameters and blocks, the memory setting that ran (auto's
    choice and predicted peak, the segment length), the pipeline's stages, schedule, micro-batches and cut."""
    from deepres.models.contract import blocks_of, net_of

    net, blocks = net_of(pl_module), blocks_of(pl_module)
    model = replace(plan.model, parameters=sum(p.numel() for p in net.parameters()) if net is not None else None,
                    blocks=len(blocks) if blocks is not None and hasattr(blocks, "__len__") else None)
    decision = getattr(pl_module, "memory_decision", None) or {}
    memory = replace(plan.memory, chosen=decision.get("chosen"), segment=decision.get("segment") or None,
                     predicted_peak_gb=decision.get("predicted_peak_gb"))
    strategy = trainer.strategy
    trainer_part = plan.trainer
    ranges = getattr(strategy, "block_ranges", None)
    if ranges is not None:  # the pipeline strategy, once it has cut the net
        trainer_part = replace(trainer_part, pipeline={
            "stages": len(ranges), "schedule": strategy.schedule, "micro_batches": strategy.microbatches,
            "cut": " | ".join(f"{a}-{b - 1}" for a, b in ranges)})
    return replace(plan, model=model, memory=memory, trainer=trainer_part)


def plan_report(plan: RunPlan, run_dir: Path):
    """The callback that completes the plan once the net is built and cut, prints it and writes plan.json
    (rank 0 only)."""
    from lightning.pytorch.callbacks import Callback

    class RunPlanReport(Callback):
        def __init__(self) -> None:
            self.plan = plan

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            self.plan = replace(completed(plan, trainer, pl_module), run_dir=str(run_dir))
            if trainer.is_global_zero:
                print("\n".join(self.plan.lines()), flush=True)
                self.plan.write(run_dir)

    return RunPlanReport()
