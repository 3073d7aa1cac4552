"""The sbatch script ``deepres submit`` writes: the packaged template with its marked blocks filled in.

The template is one file, ``deepres/slurm/deepres.sbatch`` (package data, so an installed deepres has it;
``slurm/deepres.sbatch`` is a symlink to it for use by hand). Rendering replaces the lines between
``# ---- <block>: ...`` and ``# ---- end <block> ----`` and leaves the rest as written:

    cluster   the #SBATCH lines (from the checked request; --array for a sweep)
    setup     the site's lines from ``--setup FILE`` (module load, source .../activate)
    job       the deepres command, config and overrides, shell-quoted; for a sweep a ``case`` on the array
              task id that picks the point's overrides
"""

from __future__ import annotations

import re
import shlex
from importlib import resources
from pathlib import Path

from deepres.errors import ConfigError
from deepres.slurm.request import ClusterRequest, Plan

TEMPLATE = "deepres.sbatch"
# Characters allowed in values that go into #SBATCH lines, which sbatch parses by its own rules
# (not the shell's): no whitespace, quotes, newlines or '%' (an sbatch file-name pattern).
_SBATCH_VALUE = re.compile(r"^[A-Za-z0-9_./:@+,=&|\[\]()*!-]+$")


def _sbatch_value(option: str, value: object) -> str:
    text = str(value)
    if not _SBATCH_VALUE.match(text):
        raise ConfigError(
            f"{option} {text!r}: #SBATCH lines take no spaces, quotes, '%' or control characters. "
            "Fix: use a value (or move the run directory to a path) without them."
        )
    return text


def cluster_block(request: ClusterRequest, checked: Plan, name: str, run_dir: Path, workdir: Path,
                  array: tuple[int, int | None] | None = None) -> list[str]:
    """The #SBATCH lines of the rendered script (options left unset are left out).

    ``array``: (number of tasks, at most this many at once or None) for a sweep; each task's log is then
    ``run_dir/slurm-<array job>_<task>.out``."""
    _sbatch_value("run directory", run_dir)
    options: list[tuple[str, object]] = [
        ("--job-name", name),
        ("--partition", request.partition),
        ("--account", request.account),
        ("--qos", request.qos),
        ("--constraint", request.constraint),
        ("--time", request.time),
        ("--nodes", checked.nodes),
        ("--gres", checked.gres),
        ("--gpus-per-node", None if checked.gres else checked.gpus_per_node or None),
        ("--ntasks-per-node", checked.tasks_per_node),
        ("--cpus-per-task", request.cpus_per_task),
        ("--mem", request.mem),
        ("--mem-per-cpu", request.mem_per_cpu),
        ("--mem-per-gpu", request.mem_per_gpu),
        ("--signal", f"USR1@{request.signal_lead}"),
        ("--chdir", workdir),
    ]
    lines = [f"#SBATCH {opt}={_sbatch_value(opt, value)}" for opt, value in options if value is not None]
    if request.mem is None and request.mem_per_cpu is None and request.mem_per_gpu is None:
        lines.append("# No memory request: the site's default applies (deepres submit --mem 64G, or --mem 0 for all).")
    log = "slurm-%j.out"
    if array is not None:
        tasks, limit = array
        if tasks < 1 or (limit is not None and limit < 1):
            raise ConfigError(f"--array-limit {limit}: give a positive number of tasks to run at once.")
        # '%' here is the array's limit, not a file-name pattern: written by deepres, never taken from input.
        lines.append(f"#SBATCH --array=0-{tasks - 1}" + (f"%{int(limit)}" if limit else ""))
        log = "slurm-%A_%a.out"
    # Fixed: requeue on signal, keep appending to one log per job id (checked above: run_dir is plain).
    return [*lines, "#SBATCH --requeue", "#SBATCH --open-mode=append", f"#SBATCH --output={run_dir}/{log}"]


def _array(items: list[str]) -> str:
    return "(" + " ".join(shlex.quote(item) for item in items) + ")"


def job_block(deepres: list[str], config: Path | None, args: list[str], signal_lead: int,
              points: list[list[str]] | None = None) -> list[str]:
    """The shell assignments of the rendered script; every value is shell-quoted.

    ``points``: a sweep's overrides, one list per array task (task i runs points[i])."""
    lines = [
        *(["# The Python `deepres submit` ran under; nodes that do not see this path need --python or --setup."]
          if Path(deepres[0]).is_absolute() else []),
        f"DEEPRES={_array(deepres)}",
        f"CONFIG={shlex.quote(str(config)) if config else ''}",
        f"ARGS={_array(args)}",
        f"SIGNAL_LEAD={int(signal_lead)}",
    ]
    if not points:
        return [*lines, "POINT=()"]
    lines.append('case "${SLURM_ARRAY_TASK_ID:-}" in')
    lines += [f"  {i}) POINT={_array(point)} ;;" for i, point in enumerate(points)]
    lines += ['  *) echo "[deepres.sbatch] array task ${SLURM_ARRAY_TASK_ID:-(none)} is not a point of this sweep '
              f'(0-{len(points) - 1}); submit it with sbatch --array" >&2; exit 2 ;;', "esac"]
    return lines


def setup_block(path: Path | None) -> list[str]:
    """The site setup lines of ``--setup FILE``, checked: bash syntax is checked with the whole script."""
    if path is None:
        return ["# (none: deepres submit --setup FILE puts the lines your cluster needs here)"]
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"--setup {path}: cannot read it ({err.strerror}).") from None
    lines = text.splitlines()
    if lines and lines[0].startswith("#!"):
        lines = lines[1:]
    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("#SBATCH"):
            raise ConfigError(
                f"--setup {path}, line {n}: {line.strip()!r}: sbatch reads #SBATCH lines only above the first "
                "command, so here it would be ignored. Fix: pass it as a deepres submit option (--mem, --gres, "
                "--constraint, ...), or edit the cluster block of the rendered script."
            )
        if line.strip().startswith("# ---- "):
            raise ConfigError(f"--setup {path}, line {n}: lines starting '# ---- ' mark the template's blocks.")
    return [f"# from {path}", *lines]


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
           deepres: list[str], config: Path | None, args: list[str], setup: Path | None = None,
           points: list[list[str]] | None = None, array_limit: int | None = None) -> str:
    array = (len(points), array_limit) if points else None
    script = replace_block(template_text(), "cluster",
                           cluster_block(request, checked, name, run_dir, workdir, array=array))
    script = replace_block(script, "setup", setup_block(setup))
    return replace_block(script, "job", job_block(deepres, config, args, request.signal_lead, points))
