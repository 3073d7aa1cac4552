"""What ``deepres submit`` asks SLURM for, checked against the trainer settings of the training config.

How the request and the trainer meet (SLURM starts one process per device):

    --nodes N            = trainer.num_nodes   (num_nodes 1, the default, is set to N)
    --tasks-per-node T   = trainer.devices     ("auto"/-1 is set to T); --gpus-per-node G means T = G,
                           and so does --gres gpu:G (or gpu:TYPE:G)
    --gpus-per-node G>0  needs trainer.accelerator gpu/cuda/auto ("auto" is set to gpu); none means cpu
    N x T > 1            needs a strategy whose processes SLURM may start (ddp, fsdp, deepspeed, auto),
                         not one that spawns its own (ddp_spawn, ddp_notebook, ddp_fork) or dp
    --time               longer than --signal-lead, the warning before the limit

A contradiction stops with one message naming both values and the fix; nothing is submitted.
Standard library only (and deepres.devices, deepres.errors): no torch on the login node.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from deepres.devices import parse_devices
from deepres.errors import ConfigError
from deepres.slurm.requeue import DEFAULT_SIGNAL_LEAD, parse_slurm_time

# Strategies that start their own worker processes: under srun every task already is one.
SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook", "dp", "single_device")
# SLURM's --signal accepts at most this many seconds.
MAX_SIGNAL_LEAD = 65535
# --gres for GPUs: gpu:COUNT or gpu:TYPE:COUNT.
_GPU_GRES = re.compile(r"^gpu(?::(?P<type>[A-Za-z0-9_.-]+))?:(?P<count>\d+)$")


@dataclass
class ClusterRequest:
    """What to ask SLURM for (the command-line options of ``deepres submit``)."""

    nodes: int | None = None
    tasks_per_node: int | None = None
    gpus_per_node: int | None = None
    gres: str | None = None  # "gpu:4" / "gpu:a100:4": GPUs as a generic resource, instead of gpus_per_node
    cpus_per_task: int | None = None
    mem: str | None = None  # per node; or one of the two below
    mem_per_cpu: str | None = None
    mem_per_gpu: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_lead: int = DEFAULT_SIGNAL_LEAD


@dataclass
class ProcessLayout:
    """The trainer keys that decide how many processes run where (from the resolved training config)."""

    num_nodes: int = 1
    devices: Any = "auto"
    accelerator: Any = "auto"
    strategy: Any = "auto"


@dataclass
class Plan:
    """A checked request: the numbers to render and the trainer overrides that make both agree."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int
    trainer_overrides: list[str] = field(default_factory=list)
    gres: str | None = None  # render --gres=<this> instead of --gpus-per-node


def gres_gpus(gres: str) -> int:
    """The GPU count of a --gres value (gpu:4, gpu:a100:4). Raises ConfigError for anything else."""
    match = _GPU_GRES.match(gres.strip())
    if not match:
        raise ConfigError(
            f"--gres {gres!r}: deepres asks for GPUs as gpu:COUNT or gpu:TYPE:COUNT (e.g. gpu:4, gpu:a100:4). "
            "Other generic resources: put an #SBATCH line in the --setup file's place by hand, or ask your site."
        )
    return int(match["count"])


_MEMORY = re.compile(r"^\d+[KMGT]?$", re.I)


def _check_memory(request: ClusterRequest) -> None:
    given = [(f"--{name.replace('_', '-')}", value) for name, value in
             (("mem", request.mem), ("mem_per_cpu", request.mem_per_cpu), ("mem_per_gpu", request.mem_per_gpu))
             if value is not None]
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(o for o, _ in given)}: SLURM takes one memory request. Fix: give only one.")
    for option, value in given:
        if not _MEMORY.match(str(value)):
            raise ConfigError(f"{option} {value!r}: give a size such as 64G, 500M or 0 (--mem 0: all of the node).")
    if request.mem_per_gpu is not None and not (request.gpus_per_node or request.gres):
        raise ConfigError("--mem-per-gpu without GPUs. Fix: --mem or --mem-per-cpu, or ask for GPUs.")


# ------------------------------------------------------------------------------------------- checking
def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, dict):  # {class_path: lightning.pytorch.strategies.DDPStrategy, ...}
        return str(strategy.get("class_path", "")).rsplit(".", 1)[-1].lower()
    return str(strategy).lower()


def plan(request: ClusterRequest, trainer: ProcessLayout) -> Plan:
    """Check the request against the trainer; fill what the trainer leaves open. Raises ConfigError."""
    if request.gres is not None and request.gpus_per_node is not None:
        raise ConfigError(f"--gres {request.gres} and --gpus-per-node {request.gpus_per_node}: two requests for the "
                          "same GPUs. Fix: give only one (--gres gpu:N where the site counts GPUs as gres).")
    gres_count = gres_gpus(request.gres) if request.gres is not None else None
    if gres_count is not None and request.tasks_per_node is not None and request.tasks_per_node != gres_count:
        raise ConfigError(f"--gres {request.gres} and --tasks-per-node {request.tasks_per_node} disagree: deepres "
                          f"runs one task per GPU. Fix: give only --gres {request.gres}.")
    _check_memory(request)
    gpus = request.gpus_per_node or gres_count or 0
    if request.gpus_per_node is not None and request.tasks_per_node is not None and gpus != request.tasks_per_node:
        raise ConfigError(
            f"--gpus-per-node {gpus} and --tasks-per-node {request.tasks_per_node} disagree: deepres runs one "
            f"task per GPU. Fix: give only --gpus-per-node {gpus}."
        )
    for name, value in (("--nodes", request.nodes), ("--tasks-per-node", request.tasks_per_node),
                        ("--cpus-per-task", request.cpus_per_task)):
        if value is not None and value < 1:
            raise ConfigError(f"{name} {value}: give a positive number.")
    if gpus < 0:
        raise ConfigError(f"--gpus-per-node {gpus}: give 0 or more.")
    devices = parse_devices(trainer.devices).count
    # What the command line asks for wins; what it leaves open comes from the trainer.
    tasks = request.tasks_per_node or gpus or devices or 1
    nodes = request.nodes or trainer.num_nodes or 1

    overrides: list[str] = []
    if devices is None:
        overrides += ["--trainer.devices", str(tasks)]
    elif devices != tasks:
        option = "--gpus-per-node" if request.gpus_per_node else "--gres" if gres_count else "--tasks-per-node"
        raise ConfigError(
            f"{option} {tasks} disagrees with trainer.devices={devices}: SLURM starts one task per device, so "
            f"each node would run {tasks} processes where the trainer expects {devices}. "
            f"Fix: pass --trainer.devices {tasks}, or {option} {devices}."
        )
    if trainer.num_nodes in (None, 1) and nodes != 1:
        overrides += ["--trainer.num_nodes", str(nodes)]
    elif trainer.num_nodes != nodes:
        raise ConfigError(
            f"--nodes {nodes} disagrees with trainer.num_nodes={trainer.num_nodes}. "
            f"Fix: pass --trainer.num_nodes {nodes}, or --nodes {trainer.num_nodes}."
        )

    accelerator = str(trainer.accelerator).lower()
    if gpus and accelerator == "cpu":
        raise ConfigError(
            f"--gpus-per-node {gpus} with trainer.accelerator=cpu would leave the GPUs idle. "
            "Fix: pass --trainer.accelerator gpu, or --tasks-per-node instead of --gpus-per-node."
        )
    if not gpus and accelerator in ("gpu", "cuda"):
        raise ConfigError(
            f"trainer.accelerator={accelerator} but no GPUs are requested. "
            f"Fix: pass --gpus-per-node {tasks}, or --trainer.accelerator cpu."
        )
    if accelerator == "auto":
        overrides += ["--trainer.accelerator", "gpu" if gpus else "cpu"]

    strategy = _strategy_name(trainer.strategy)
    if nodes * tasks > 1 and (strategy in SPAWNING_STRATEGIES or "spawn" in strategy):
        raise ConfigError(
            f"trainer.strategy={strategy} starts its own processes, but SLURM already starts {nodes * tasks} "
            "(one per device). Fix: pass --trainer.strategy ddp (or auto)."
        )

    if request.time is not None:
        limit = _parse_time(request.time)
        if limit is not None and limit <= request.signal_lead:
            raise ConfigError(
                f"--time {request.time} ({limit} s) is not longer than --signal-lead {request.signal_lead} s: "
                "the job would be told to checkpoint and requeue before it could train. "
                f"Fix: a longer --time, or --signal-lead below {limit}."
            )
    if not 1 <= request.signal_lead <= MAX_SIGNAL_LEAD:
        raise ConfigError(f"--signal-lead {request.signal_lead}: give seconds between 1 and {MAX_SIGNAL_LEAD}.")
    return Plan(nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus, trainer_overrides=overrides,
                gres=request.gres.strip() if request.gres is not None else None)


def _parse_time(value: str) -> int | None:
    try:
        return parse_slurm_time(value)
    except ValueError as err:
        raise ConfigError(f"--time {value}: {err}.") from None
