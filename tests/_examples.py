"""Run every shell and YAML example of README.md and docs/*.md; write one JSON line per block.

    python tests/_examples.py OUT.jsonl [PAGE.md ...]

What runs, and how (the text of docs/configuration.md, "How the examples are checked", says the same):

- A fenced ```bash block is split into commands (backslash continuations joined, comments dropped, `&&`
  and `;` separating commands, `> FILE` redirecting the output). `deepres fit | validate | test` runs in
  smoke mode: SMOKE_FIT is appended (2 steps of 2 batches, one validation batch), which shortens the run and
  changes nothing else. Other `deepres` commands run as written, and so do `python -c CODE`, `cat`,
  `ls` and `head`. Any other command is checked with `bash -n` only.
- A fenced ```yaml block that is a configuration is written to a file and trained from
  (`deepres fit --config FILE` in smoke mode).
- A block preceded by `<!-- example: KIND -->` needs what a CPU in a test cannot give: KIND is `gpu`,
  `cluster` (SLURM, several nodes), `processes` (several training processes on one machine; the
  multi-process tests in tests/test_strategies.py and tests/test_pipeline.py run those), `data` (a dataset on disk), `install` (pip, the network) or `long`
  (more than a few seconds even in smoke mode). It is checked as far as a CPU allows: `deepres fit`
  with `--print_config` (every value parsed and the run plan's checks made), `deepres submit` with
  `--dry-run` (the request checked against the training config, the script rendered and checked with
  `bash -n`), other commands with `bash -n`. In an `install` block the `deepres` commands still run in
  smoke mode (they need only what is installed).

The blocks of one page run in order in one directory (HOME is that directory, so `~/data/...` is
inside it): a later block may use a file an earlier one wrote (`my.yaml`, `runs/exp1`). Each deepres
command runs in a process forked from this one after deepres, torch and Lightning are imported, so a
command costs its own work, not the imports.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOKE_FIT = ["--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1"]
MARKS = ("gpu", "cluster", "processes", "data", "install", "long")
READ_ONLY = ("cat", "ls", "head")  # commands that only show files: run as written
CONFIG_SECTIONS = {"model", "data", "trainer", "run", "wandb", "diagnostics", "seed_everything", "ckpt_path"}
DEEPRES = ("deepres", ".venv/bin/deepres")
FENCE = re.compile(r"^```(bash|yaml)\n(.*?)^```$", re.S | re.M)
MARK = re.compile(r"<!--\s*example:\s*([\w-]+)\s*-->\s*\n$")


@dataclass
class Block:
    page: str
    line: int
    lang: str
    text: str
    mark: str | None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


@dataclass
class Result:
    id: str
    lang: str
    mark: str | None
    ok: bool = True
    commands: list[str] = field(default_factory=list)
    how: list[str] = field(default_factory=list)  # "smoke", "run", "print_config", "dry-run", "bash -n", "yaml"
    error: str = ""
    seconds: float = 0.0


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        mark = MARK.search(text[: m.start()][-200:])
        kind = mark.group(1) if mark else None
        if kind is not None and kind not in MARKS:
            raise ValueError(f"{page.name}: unknown example mark {kind!r} (one of {', '.join(MARKS)})")
        line = text.count("\n", 0, m.start()) + 1
        name = str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name
        found.append(Block(name, line, m.group(1), m.group(2), kind))
    return found


def commands(script: str) -> list[tuple[list[str], str | None]]:
    """(argv, redirect file) for every command of a shell block."""
    joined = re.sub(r"\\\n\s*", " ", script)
    out = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        argv: list[str] = []
        redirect = None
        tokens = list(lexer)
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token in ("&&", ";", "||"):
                if argv:
                    out.append((argv, redirect))
                argv, redirect = [], None
            elif token == ">" and i + 1 < len(tokens):
                redirect = tokens[i + 1]
                i += 1
            else:
                argv.append(token)
            i += 1
        if argv:
            out.append((argv, redirect))
    return out


def _expand(argv: list[str], home: Path) -> list[str]:
    return [str(home / a[2:]) if a.startswith("~/") else a for a in argv]


def run_forked(function, argv: list[str], workdir: Path, log: Path, redirect: Path | None) -> tuple[int, str]:
    """function(argv) in a forked child with cwd workdir; (exit status, tail of its output)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            os.chdir(workdir)
            os.environ["HOME"] = str(workdir)
            with open(log, "w") as err_file:
                os.dup2(err_file.fileno(), 2)
                out_file = open(redirect, "w") if redirect else err_file  # noqa: SIM115
                os.dup2(out_file.fileno(), 1)
                sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
                sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
                try:
                    status = int(function(argv) or 0)
                except SystemExit as stop:
                    status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
                sys.stdout.flush()
                sys.stderr.flush()
        except BaseException:  # noqa: BLE001  (reported through the log and the status)
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        os._exit(status)
    _, raw = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(raw)
    return status, log.read_text()[-3000:] if log.exists() else ""


def _deepres(argv: list[str]) -> int:
    from deepres.cli import main

    return main(argv)


def _submit(argv: list[str]) -> int:
    """`deepres submit`, its `deepres fit --print_config` checks run in forks of this process (same parser,
    same arguments) instead of fresh interpreters: the same answers without paying the imports again."""
    import tempfile

    from deepres.slurm import submit

    def print_config(command: list[str]) -> subprocess.CompletedProcess[str]:
        with tempfile.TemporaryDirectory() as tmp:
            printed, log = Path(tmp) / "printed.yaml", Path(tmp) / "log"
            status, output = run_forked(_deepres, command[3:], Path.cwd(), log, printed)
            return subprocess.CompletedProcess(command, status, printed.read_text() if printed.exists() else "",
                                               output)

    submit._run_print_config = print_config
    return _deepres(argv)


def _python_code(argv: list[str]) -> int:
    exec(compile(argv[0], "<example>", "exec"), {"__name__": "__example__"})  # noqa: S102
    return 0


def check_command(argv: list[str], redirect: str | None, block: Block, workdir: Path, result: Result) -> None:
    argv = _expand(argv, workdir)
    result.commands.append(shlex.join(argv))
    log = workdir / f".example-{len(result.commands)}.log"
    target = workdir / redirect if redirect else None
    marked = block.mark is not None and block.mark != "install"
    if argv[0] in DEEPRES:
        args = argv[1:] or ["fit"]
        if args[0].startswith("-"):
            args = ["fit", *args]
        if args[0] in ("fit", "validate", "test"):
            if marked:
                args, how = [*args, "--print_config"], "print_config"
                target = target or workdir / ".printed.yaml"
            elif "--print_config" in args or "--help" in args or "-h" in args:
                how = "run"
            else:
                args, how = [*args, *SMOKE_FIT], "smoke"
        elif args[0] == "submit" and "--dry-run" not in args:
            args = [args[0], "--dry-run", *args[1:]]
            how = "dry-run"
            target = target or workdir / ".submit.sbatch"
        elif marked:
            how = "bash -n"
        else:
            how = "run"
        if how != "bash -n":
            status, output = run_forked(_submit if args[0] == "submit" else _deepres, args, workdir, log, target)
            result.how.append(how)
            if status != 0:
                result.ok = False
                result.error = f"`deepres {shlex.join(args)}` exited {status}:\n{output}"
            return
    elif argv[0] in ("python", "python3") and len(argv) >= 3 and argv[1] == "-c" and not marked:
        status, output = run_forked(_python_code, argv[2:], workdir, log, target)
        result.how.append("run")
        if status != 0:
            result.ok = False
            result.error = f"python -c exited {status}:\n{output}"
        return
    if argv[0] in READ_ONLY and not marked:
        shown = subprocess.run(argv, cwd=workdir, capture_output=True, text=True)
        result.how.append("run")
        if shown.returncode != 0:
            result.ok, result.error = False, f"`{shlex.join(argv)}` exited {shown.returncode}: {shown.stderr.strip()}"
        return
    syntax = subprocess.run(["bash", "-n", "-c", shlex.join(argv)], capture_output=True, text=True)
    result.how.append("bash -n")
    if syntax.returncode != 0:
        result.ok = False
        result.error = f"`{shlex.join(argv)}` is not valid shell: {syntax.stderr.strip()}"


def check_yaml(block: Block, workdir: Path, index: int, result: Result) -> None:
    import yaml

    try:
        loaded = yaml.safe_load(block.text)
    except yaml.YAMLError as err:
        result.ok, result.error = False, f"not valid YAML: {err}"
        return
    result.how.append("yaml")
    if not isinstance(loaded, dict) or not set(loaded) <= CONFIG_SECTIONS:
        return  # not a training configuration (parsed only)
    path = workdir / f"example-{index}.yaml"
    path.write_text(block.text)
    check_command(["deepres", "fit", "--config", path.name], None, block, workdir, result)


def run_page(page: Path, sandbox: Path, only_lines: set[int] | None = None) -> list[Result]:
    workdir = sandbox / page.stem
    workdir.mkdir(parents=True, exist_ok=True)
    results = []
    for index, block in enumerate(blocks(page)):
        if only_lines and block.line not in only_lines:
            continue
        result = Result(block.id, block.lang, block.mark)
        start = time.perf_counter()
        if block.lang == "yaml":
            check_yaml(block, workdir, index, result)
        else:
            for argv, redirect in commands(block.text):
                check_command(argv, redirect, block, workdir, result)
                if not result.ok:
                    break
        result.seconds = round(time.perf_counter() - start, 2)
        results.append(result)
    return results


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    chosen = [Path(p).resolve() for p in argv[1:]] or pages()
    sandbox = out.parent / "examples"
    os.environ.setdefault("WANDB_MODE", "disabled")  # no wandb run for an example (the option is not changed)
    with contextlib.suppress(ImportError):  # the forked commands start with torch and Lightning imported
        import lightning.pytorch  # noqa: F401
        import torch

        import deepres.training.cli  # noqa: F401

        torch.set_num_threads(1)
    with out.open("w") as f:
        for page in chosen:
            for result in run_page(page, sandbox):
                f.write(json.dumps(asdict(result)) + "\n")
                f.flush()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main(sys.argv[1:]))
