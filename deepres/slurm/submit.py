"""``deepres submit``: one training run as a SLURM job, checked before anything is queued.

    deepres submit --config FILE [--nodes N] [--gpus-per-node G | --tasks-per-node T] [--cpus-per-task C]
                   [--mem M] [--time T] [--partition P] [--account A] [--qos Q] [--constraint C]
                   [--signal-lead S] [--name NAME] [--dry-run] [training overrides ...]

Steps: resolve the training config exactly as ``deepres fit`` would (its own ``--print_config``), check the
cluster request against the trainer, render the sbatch template into ``runs/<name>/submit.sbatch``,
``sbatch --parsable`` it, print the job id and how to follow it. The template is one file,
``deepres/slurm/deepres.sbatch`` (package data, so an installed deepres has it); ``slurm/deepres.sbatch`` is a
symlink to it for use by hand. Rendering replaces its two marked blocks ("cluster": the #SBATCH lines;
"job": command, config and overrides) and leaves the rest as written.

How the request and the trainer meet (SLURM starts one process per device):

    --nodes N            = trainer.num_nodes   (num_nodes 1, the default, is set to N)
    --tasks-per-node T   = trainer.devices     ("auto"/-1 is set to T); --gpus-per-node G means T = G
    --gpus-per-node G>0  needs trainer.accelerator gpu/cuda/auto ("auto" is set to gpu); none means cpu
    N x T > 1            needs a strategy whose processes SLURM may start (ddp, fsdp, deepspeed, auto),
                         not one that spawns its own (ddp_spawn, ddp_notebook, ddp_fork) or dp
    --time               longer than --signal-lead, the warning before the limit

A contradiction stops with one message naming both values and the fix; nothing is submitted.
Options not listed above are passed to ``deepres fit`` unchanged.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from deepres.devices import parse_devices
from deepres.errors import ConfigError
from deepres.slurm.requeue import DEFAULT_SIGNAL_LEAD, parse_slurm_time

TEMPLATE = "deepres.sbatch"
# Strategies that start their own worker processes: under srun every task already is one.
SPAWNING_STRATEGIES = ("ddp_spawn", "ddp_fork", "ddp_notebook", "dp", "single_device")
# SLURM's --signal accepts at most this many seconds.
MAX_SIGNAL_LEAD = 65535
# Characters allowed in values that go into #SBATCH lines, which sbatch parses by its own rules
# (not the shell's): no whitespace, quotes, newlines or '%' (an sbatch file-name pattern).
_SBATCH_VALUE = re.compile(r"^[A-Za-z0-9_./:@+,=&|\[\]()*!-]+$")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class ClusterRequest:
    """What to ask SLURM for (the command-line options of ``deepres submit``)."""

    nodes: int | None = None
    tasks_per_node: int | None = None
    gpus_per_node: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_lead: int = DEFAULT_SIGNAL_LEAD


@dataclass
class TrainerSettings:
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


# ------------------------------------------------------------------------------------------- checking
def _strategy_name(strategy: Any) -> str:
    if isinstance(strategy, dict):  # {class_path: lightning.pytorch.strategies.DDPStrategy, ...}
        return str(strategy.get("class_path", "")).rsplit(".", 1)[-1].lower()
    return str(strategy).lower()


def plan(request: ClusterRequest, trainer: TrainerSettings) -> Plan:
    """Check the request against the trainer; fill what the trainer leaves open. Raises ConfigError."""
    gpus = request.gpus_per_node or 0
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
        option = "--gpus-per-node" if request.gpus_per_node else "--tasks-per-node"
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
    return Plan(nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus, trainer_overrides=overrides)


def _parse_time(value: str) -> int | None:
    try:
        return parse_slurm_time(value)
    except ValueError as err:
        raise ConfigError(f"--time {value}: {err}.") from None


# ------------------------------------------------------------------------------------------ rendering
def _sbatch_value(option: str, value: object) -> str:
    text = str(value)
    if not _SBATCH_VALUE.match(text):
        raise ConfigError(
            f"{option} {text!r}: #SBATCH lines take no spaces, quotes, '%' or control characters. "
            "Fix: use a value (or move the run directory to a path) without them."
        )
    return text


def cluster_block(request: ClusterRequest, checked: Plan, name: str, run_dir: Path, workdir: Path) -> list[str]:
    """The #SBATCH lines of the rendered script (options left unset are left out)."""
    _sbatch_value("run directory", run_dir)
    options: list[tuple[str, object]] = [
        ("--job-name", name),
        ("--partition", request.partition),
        ("--account", request.account),
        ("--qos", request.qos),
        ("--constraint", request.constraint),
        ("--time", request.time),
        ("--nodes", checked.nodes),
        ("--gpus-per-node", checked.gpus_per_node or None),
        ("--ntasks-per-node", checked.tasks_per_node),
        ("--cpus-per-task", request.cpus_per_task),
        ("--mem", request.mem),
        ("--signal", f"USR1@{request.signal_lead}"),
        ("--chdir", workdir),
    ]
    lines = [f"#SBATCH {opt}={_sbatch_value(opt, value)}" for opt, value in options if value is not None]
    # Fixed: requeue on signal, keep appending to one log per job id (checked above: run_dir is plain).
    return [*lines, "#SBATCH --requeue", "#SBATCH --open-mode=append", f"#SBATCH --output={run_dir}/slurm-%j.out"]


def job_block(deepres: list[str], config: Path | None, args: list[str], signal_lead: int) -> list[str]:
    """The shell assignments of the rendered script; every value is shell-quoted."""

    def array(items: list[str]) -> str:
        return "(" + " ".join(shlex.quote(item) for item in items) + ")"

    return [
        f"DEEPRES={array(deepres)}",
        f"CONFIG={shlex.quote(str(config)) if config else ''}",
        f"ARGS={array(args)}",
        f"SIGNAL_LEAD={int(signal_lead)}",
    ]


def replace_block(script: str, block: str, lines: list[str]) -> str:
    """Replace the lines between ``# ---- <block>...`` and ``# ---- end <block> ----``."""
    source = script.splitlines()
    starts = [i for i, line in enumerate(source) if line.startswith(f"# ---- {block}:")]
    ends = [i for i, line in enumerate(source) if line.strip() == f"# ---- end {block} ----"]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ConfigError(f"the sbatch template has no single '{block}' block; reinstall deepres.")
    return "\n".join([*source[: starts[0] + 1], *lines, *source[ends[0] :]]) + "\n"


def template_text() -> str:
    return (resources.files("deepres.slurm") / TEMPLATE).read_text()


def render(request: ClusterRequest, checked: Plan, *, name: str, run_dir: Path, workdir: Path,
           deepres: list[str], config: Path | None, args: list[str]) -> str:
    script = replace_block(template_text(), "cluster", cluster_block(request, checked, name, run_dir, workdir))
    return replace_block(script, "job", job_block(deepres, config, args, request.signal_lead))


# ------------------------------------------------------------------------------- the training config
def resolve_trainer(config: Path | None, overrides: list[str]) -> TrainerSettings:
    """The trainer settings ``deepres fit`` would use, from its own config printer.

    Asking the training CLI (rather than reading the YAML here) applies its defaults, the config and the
    overrides exactly as the job will, and rejects a typo in them now instead of in the queue.
    """
    command = [sys.executable, "-m", "deepres", "fit", *(["--config", str(config)] if config else []),
               *overrides, "--print_config"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-12:]
        raise ConfigError(
            "the training config does not parse as `deepres fit` would read it:\n  " + "\n  ".join(detail)
            + f"\nFix the config or overrides; check with: deepres fit {' '.join(map(shlex.quote, command[4:-1]))}"
            " --print_config"
        )
    trainer = (yaml.safe_load(result.stdout) or {}).get("trainer") or {}
    return TrainerSettings(
        num_nodes=int(trainer.get("num_nodes") or 1),
        devices=trainer.get("devices", "auto"),
        accelerator=trainer.get("accelerator", "auto"),
        strategy=trainer.get("strategy", "auto"),
    )


# ------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepres submit",
        description="Submit one deepres training run to SLURM. Options not listed here go to `deepres fit`.",
        allow_abbrev=False,  # "--n 2" must not silently mean --nodes
    )
    parser.add_argument("--config", type=Path, help="training config (YAML); default: the built-in default job")
    parser.add_argument("--nodes", type=int, help="nodes (= trainer.num_nodes)")
    tasks = parser.add_mutually_exclusive_group()
    tasks.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU")
    tasks.add_argument("--tasks-per-node", type=int, help="processes per node on CPU nodes (= trainer.devices)")
    parser.add_argument("--cpus-per-task", type=int)
    parser.add_argument("--mem", help="memory per node, e.g. 64G (0: all)")
    parser.add_argument("--time", help="time limit, e.g. 4:00:00 or 1-00:00:00")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--signal-lead", type=int, default=DEFAULT_SIGNAL_LEAD,
                        help=f"seconds before the time limit to checkpoint and requeue (default {DEFAULT_SIGNAL_LEAD})")
    parser.add_argument("--name", help="run name: runs/<name>/ (default: config name + time)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories go (default runs)")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    return parser


def _run_name(name: str | None, config: Path | None) -> str:
    if name is None:
        name = f"{config.stem if config else 'default'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not _RUN_NAME.match(name):
        raise ConfigError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (it names a directory and the job).")
    return name


def run_dir_overrides(name: str, runs_dir: Path) -> list[str]:
    """Make `deepres fit` write into runs_dir/name, where this job's script is (and stays, after requeues)."""
    return ["--run.root", str(runs_dir), "--run.name", name]


def _check_run_dir_is_new(run_dir: Path, overrides: list[str]) -> None:
    resuming = any(arg == "--ckpt_path" or arg.startswith("--ckpt_path=") for arg in overrides)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not resuming:
        raise ConfigError(
            f"run directory {run_dir} already exists. Fix: choose another --name (or leave it out for a new "
            "timestamped one), or add --ckpt_path last to continue that run."
        )


def _sbatch(script_path: Path) -> str:
    if shutil.which("sbatch") is None:
        raise ConfigError(
            "sbatch is not on PATH: run this on a SLURM login node, or try deepres on this machine with the "
            "local cluster: scripts/slurm_local.sh start, then the `export SLURM_CONF=...` line it prints."
        )
    # Not the submitting process's wandb service: the job starts its own (see the template).
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    result = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, check=False,
                            env=env)
    if result.returncode != 0:
        raise ConfigError(f"sbatch refused {script_path}: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    options, overrides = _parser().parse_known_args(argv)
    try:
        return _submit(options, overrides)
    except ConfigError as err:
        print(f"deepres submit: {err}", file=sys.stderr)
        return 2


def _submit(options: argparse.Namespace, overrides: list[str]) -> int:
    config = options.config.resolve() if options.config else None
    if config is not None and not config.is_file():
        raise ConfigError(f"--config {options.config}: no such file.")
    request = ClusterRequest(
        nodes=options.nodes, tasks_per_node=options.tasks_per_node, gpus_per_node=options.gpus_per_node,
        cpus_per_task=options.cpus_per_task, mem=options.mem, time=options.time, partition=options.partition,
        account=options.account, qos=options.qos, constraint=options.constraint, signal_lead=options.signal_lead,
    )
    name = _run_name(options.name, config)
    runs_dir = options.runs_dir.resolve()
    run_dir = runs_dir / name
    _check_run_dir_is_new(run_dir, overrides)
    checked = plan(request, resolve_trainer(config, overrides))
    args = [*overrides, *checked.trainer_overrides, *run_dir_overrides(name, runs_dir)]
    script = render(request, checked, name=name, run_dir=run_dir, workdir=Path.cwd(),
                    deepres=[sys.executable, "-m", "deepres"], config=config, args=args)
    if options.dry_run:
        sys.stdout.write(script)
        return 0

    run_dir.mkdir(parents=True, exist_ok=True)
    script_path = run_dir / "submit.sbatch"
    script_path.write_text(script)
    job_id = _sbatch(script_path)
    log = run_dir / f"slurm-{job_id}.out"
    shown = os.path.relpath(log) if log.is_relative_to(Path.cwd()) else str(log)
    print(
        f"submitted job {job_id}: {checked.nodes} node(s) x {checked.tasks_per_node} task(s), run directory {run_dir}\n"
        f"  script:  {script_path}\n"
        f"  log:     {shown}\n"
        f"  follow:  tail -f {shlex.quote(shown)}\n"
        f"           squeue -j {job_id}\n"
        f"  cancel:  scancel {job_id}   (test preemption: scancel --signal=USR1 {job_id})"
    )
    return 0
