"""``deepres submit``: a training run, or a sweep of runs, as a SLURM job, checked before anything is queued.

    deepres submit [--config FILE] [--nodes N] [--gpus-per-node G | --gres gpu:G | --tasks-per-node T]
                   [--cpus-per-task C] [--mem M | --mem-per-cpu M | --mem-per-gpu M] [--time T] [--partition P]
                   [--account A] [--qos Q] [--constraint C] [--signal-lead S] [--setup FILE] [--python PATH]
                   [--sweep KEY=V1,V2,... ...] [--array-limit N] [--name NAME] [--dry-run]
                   [training overrides ...] [-- training overrides ...]

Steps: resolve the training config exactly as ``deepres fit`` would (its own ``--print_config``; for a sweep,
once per value of every key), check the cluster request against the trainer (deepres.slurm.request), render
the sbatch template (deepres.slurm.render) into ``runs/<name>/submit.sbatch``, check it with ``bash -n``,
``sbatch --parsable`` it, print the job id and how to follow it.

Everything after ``--`` goes to ``deepres fit`` unchanged; before it, options this command does not know do too.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from deepres.errors import ConfigError
from deepres.slurm.render import cluster_block, job_block, render, replace_block, template_text  # noqa: F401
from deepres.slurm.request import ClusterRequest, Plan, ProcessLayout, plan  # noqa: F401
from deepres.slurm.requeue import DEFAULT_SIGNAL_LEAD, SUBMIT_SCRIPT
from deepres.slurm.sweep import Sweep, record_array_job

_RUN_NAME_CHARS = "letters, digits, '.', '_' and '-'"


# ------------------------------------------------------------------------------- the training config
def _print_config_command(config: Path | None, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "deepres", "fit", *(["--config", str(config)] if config else []),
            *overrides, "--print_config"]


def _trainer_settings(command: list[str], result: subprocess.CompletedProcess[str]) -> ProcessLayout:
    if result.returncode != 0:
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-12:]
        raise ConfigError(
            "the training config does not parse as `deepres fit` would read it:\n  " + "\n  ".join(detail)
            + f"\nFix the config or overrides; check with: deepres fit {' '.join(map(shlex.quote, command[4:-1]))}"
            " --print_config"
        )
    trainer = (yaml.safe_load(result.stdout) or {}).get("trainer") or {}
    return ProcessLayout(
        num_nodes=int(trainer.get("num_nodes") or 1),
        devices=trainer.get("devices", "auto"),
        accelerator=trainer.get("accelerator", "auto"),
        strategy=trainer.get("strategy", "auto"),
    )


def _run_print_config(command: list[str]) -> subprocess.CompletedProcess[str]:
    # Not the submitting process's wandb service, nor its SLURM job (a submit from inside an allocation).
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return subprocess.run(command, capture_output=True, text=True, check=False, env=env)


def resolve_trainer(config: Path | None, overrides: list[str]) -> ProcessLayout:
    """The trainer settings ``deepres fit`` would use, from its own config printer.

    Asking the training CLI (rather than reading the YAML here) applies its defaults, the config and the
    overrides exactly as the job will, and rejects a typo in them now instead of in the queue.
    """
    command = _print_config_command(config, overrides)
    return _trainer_settings(command, _run_print_config(command))


def resolve_sweep(config: Path | None, overrides: list[str], sweep: Sweep) -> ProcessLayout:
    """Resolve every value of every swept key (a bad value fails now, not in task 4 of the array, hours later);
    all points must need the same resources, since one array asks SLURM for the same for every task."""
    points = sweep.checks()
    commands = [_print_config_command(config, [*overrides, *p.overrides()]) for p in points]
    with ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
        results = list(pool.map(_run_print_config, commands))
    settings = []
    for point, command, result in zip(points, commands, results, strict=True):
        try:
            settings.append(_trainer_settings(command, result))
        except ConfigError as err:
            raise ConfigError(f"sweep point {point.name}: {err}") from None
    for point, found in zip(points, settings, strict=True):
        if found != settings[0]:
            raise ConfigError(f"sweep point {point.name} runs as {found}, point {points[0].name} as {settings[0]}: "
                              "one job array asks for the same resources for every task. Fix: sweep keys that do "
                              "not change devices, nodes or strategy, or submit those separately.")
    return settings[0]


# ------------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepres submit",
        description="Submit a deepres training run, or a sweep of runs as one job array, to SLURM. Options not "
                    "listed here, and everything after `--`, go to `deepres fit`.",
        allow_abbrev=False,  # "--n 2" must not silently mean --nodes
    )
    parser.add_argument("--config", type=Path, help="training config (YAML); default: the built-in default job")
    parser.add_argument("--nodes", type=int, help="nodes (= trainer.num_nodes)")
    tasks = parser.add_mutually_exclusive_group()
    tasks.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU")
    tasks.add_argument("--gres", help="GPUs as a generic resource: gpu:N or gpu:TYPE:N (instead of --gpus-per-node)")
    tasks.add_argument("--tasks-per-node", type=int, help="processes per node on CPU nodes (= trainer.devices)")
    parser.add_argument("--cpus-per-task", type=int)
    memory = parser.add_mutually_exclusive_group()
    memory.add_argument("--mem", help="memory per node, e.g. 64G (0: all of it); default: the site's default")
    memory.add_argument("--mem-per-cpu", help="memory per CPU, e.g. 4G")
    memory.add_argument("--mem-per-gpu", help="memory per GPU, e.g. 80G")
    parser.add_argument("--time", help="time limit, e.g. 4:00:00 or 1-00:00:00")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--qos")
    parser.add_argument("--constraint")
    parser.add_argument("--signal-lead", type=int, default=DEFAULT_SIGNAL_LEAD,
                        help=f"seconds before the time limit to checkpoint and requeue (default {DEFAULT_SIGNAL_LEAD})")
    parser.add_argument("--setup", type=Path,
                        help="file of site setup lines (module load ..., source .../activate) run before deepres")
    parser.add_argument("--python",
                        help="the Python that runs deepres on the nodes (default: `python` on PATH after --setup; "
                             "without --setup, the Python running this command)")
    parser.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                        help="sweep a config key over values; several --sweep: their product; one array task each")
    parser.add_argument("--array-limit", type=int, metavar="N", help="a sweep runs at most N tasks at once (%%N)")
    parser.add_argument("--name", help="run name: runs/<name>/ (default: config name + time)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="where run directories go (default runs)")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    return parser


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this command's part, what goes to `deepres fit` untouched): split at the first ``--``."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, []


def _run_name(name: str | None, config: Path | None, sweep: bool = False) -> str:
    if name is None:
        stem = config.stem if config else "default"
        name = f"{stem}{'-sweep' if sweep else ''}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not (name[:1].isalnum() and all(c.isalnum() or c in "._-" for c in name) and name.isascii()):
        raise ConfigError(f"--name {name!r}: use {_RUN_NAME_CHARS} (it names a directory and the job).")
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


def _python(options: argparse.Namespace) -> str:
    if options.python:
        return options.python
    # With site setup lines, the environment they activate is the one to use; the submitting machine's Python
    # path may not exist on the nodes. Without, it is the best guess (a shared file system), said in the script.
    return "python" if options.setup else sys.executable


def _check_bash(script: str, setup: Path | None) -> None:
    if shutil.which("bash") is None:
        return
    result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        where = f" (the lines from --setup {setup} are in it)" if setup else ""
        raise ConfigError(f"the rendered script is not valid bash{where}: {result.stderr.strip()}")


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
    own, passthrough = split_passthrough(list(sys.argv[1:] if argv is None else argv))
    options, overrides = _parser().parse_known_args(own)
    try:
        return _submit(options, [*overrides, *passthrough])
    except ConfigError as err:
        print(f"deepres submit: {err}", file=sys.stderr)
        return 2


def _submit(options: argparse.Namespace, overrides: list[str]) -> int:
    config = options.config.resolve() if options.config else None
    if config is not None and not config.is_file():
        raise ConfigError(f"--config {options.config}: no such file.")
    if options.setup is not None and not options.setup.is_file():
        raise ConfigError(f"--setup {options.setup}: no such file.")
    sweep = Sweep.parse(options.sweep, overrides) if options.sweep else None
    if options.array_limit is not None and sweep is None:
        raise ConfigError("--array-limit without --sweep: it limits how many of a sweep's tasks run at once.")
    request = ClusterRequest(
        nodes=options.nodes, tasks_per_node=options.tasks_per_node, gpus_per_node=options.gpus_per_node,
        gres=options.gres, cpus_per_task=options.cpus_per_task, mem=options.mem, mem_per_cpu=options.mem_per_cpu,
        mem_per_gpu=options.mem_per_gpu, time=options.time, partition=options.partition, account=options.account,
        qos=options.qos, constraint=options.constraint, signal_lead=options.signal_lead,
    )
    name = _run_name(options.name, config, sweep=sweep is not None)
    runs_dir = options.runs_dir.resolve()
    run_dir = runs_dir / name
    _check_run_dir_is_new(run_dir, overrides)
    trainer = resolve_sweep(config, overrides, sweep) if sweep else resolve_trainer(config, overrides)
    checked = plan(request, trainer)
    setup = options.setup.resolve() if options.setup else None
    deepres = [_python(options), "-m", "deepres"]
    if sweep is None:
        args = [*overrides, *checked.trainer_overrides, *run_dir_overrides(name, runs_dir)]
        script = render(request, checked, name=name, run_dir=run_dir, workdir=Path.cwd(), deepres=deepres,
                        config=config, args=args, setup=setup)
    else:
        # Each point runs in run_dir/<point>: --run.root is the sweep's directory, --run.name the point's.
        args = [*overrides, *checked.trainer_overrides, "--run.root", str(run_dir)]
        points = [[*p.overrides(), "--run.name", p.name] for p in sweep.points()]
        script = render(request, checked, name=name, run_dir=run_dir, workdir=Path.cwd(), deepres=deepres,
                        config=config, args=args, setup=setup, points=points, array_limit=options.array_limit)
    _check_bash(script, setup)
    if options.dry_run:
        sys.stdout.write(script)
        return 0

    run_dir.mkdir(parents=True, exist_ok=True)
    if sweep is not None:
        sweep.write(run_dir, array_limit=options.array_limit)
    script_path = run_dir / SUBMIT_SCRIPT
    script_path.write_text(script)
    job_id = _sbatch(script_path)
    if sweep is not None:
        record_array_job(run_dir, job_id)
    log = run_dir / (f"slurm-{job_id}_<task>.out" if sweep else f"slurm-{job_id}.out")
    shown = os.path.relpath(log) if log.is_relative_to(Path.cwd()) else str(log)
    what = (f"job array {job_id}: {len(sweep.points())} points (tasks 0-{len(sweep.points()) - 1}"
            f"{f', at most {options.array_limit} at once' if options.array_limit else ''}), each"
            if sweep else f"job {job_id}:")
    lines = [
        f"submitted {what} {checked.nodes} node(s) x {checked.tasks_per_node} task(s), run directory {run_dir}",
        f"  script:  {script_path}",
        f"  log:     {shown}",
    ]
    if sweep:
        lines += [f"  points:  {run_dir}/<point>/ ({', '.join(p.name for p in sweep.points()[:3])}"
                  f"{', ...' if len(sweep.points()) > 3 else ''})",
                  f"  follow:  squeue -j {job_id}",
                  f"  results: deepres sweep-summary {shlex.quote(os.path.relpath(run_dir))}",
                  f"  cancel:  scancel {job_id}   (one task: scancel {job_id}_<task>; preempt one, as SLURM "
                  f"would: scontrol requeue {job_id}_<task>)"]
    else:
        lines += [f"  follow:  tail -f {shlex.quote(shown)}",
                  f"           squeue -j {job_id}",
                  f"  cancel:  scancel {job_id}   (test preemption: scancel --signal=USR1 {job_id})"]
    print("\n".join(lines))
    return 0
