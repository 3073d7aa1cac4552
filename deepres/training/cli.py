"""`deepres fit | validate | test`: LightningCLI with deepres's defaults and run directories.

    deepres fit                                     # the built-in default: 100-layer Highway MLP on digits
    deepres fit --config resnet110_cifar10 --data.data_dir ~/data/cifar    # a config that ships with deepres
    deepres fit --model.depth 1000 --trainer.max_epochs 5
    deepres fit --run.name my-run --ckpt_path last  # resume runs/my-run
    deepres fit --print_config                      # the full resolved configuration

Outputs go to `<run.root>/<run.name>/`: plan.json, config.yaml, run_info.json, metrics.csv, checkpoints/.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import lightning as L
import yaml
from jsonargparse import ArgumentError, set_parsing_settings
from lightning.pytorch.cli import LightningCLI

from deepres.errors import ConfigError
from deepres.lightning_compat import use_patient_process_observer
from deepres.observability.diagnostics import DiagnosticsConfig
from deepres.observability.wandb_logging import WandbConfig
from deepres.slurm.job import SlurmJob, prepare_process
from deepres.strategies import resolve_strategy
from deepres.training.assembly import trainer_parts
from deepres.training.checkpoints import (
    CheckpointWriteError,
    checkpoint_global_step,
    damage,
    describe_checkpoints_dir,
    find_resume_checkpoint,
    load_checkpoint,
    remove_stale_temporaries,
)
from deepres.training.key_suggestions import choice_hint, class_option_hint, suggest, where_in_config
from deepres.training.plan import build_plan, effective_model_options, plan_report
from deepres.training.quiet_logs import quiet_third_party
from deepres.training.resume_check import ALLOW_OPTION, ResumeSettings, check_resume, live_settings
from deepres.training.run_dir import (
    ENV_RESUME,
    ENV_RUN_DIR,
    abandon_unused_claims,
    await_run_dir,
    claim_new_run_dir,
    job_run_dir,
    launch_rank,
    lock_run_dir,
    publish_run_dir,
    release_run_dir_locks,
    resolve_run_dir,
    truncate_metrics,
    write_finished,
    write_run_info,
)

DEFAULT_MODEL = "deepres.training.Classifier"
DEFAULT_DATA = "deepres.data.DigitsDataModule"


@dataclass
class RunConfig:
    """Where a run writes and how often it checkpoints."""

    name: str | None = None
    """Run name; outputs go to <root>/<name>/. Default: the config file's stem, or "default"."""
    root: str = "runs"
    """Folder that holds all run directories."""
    checkpoint_every_n_steps: int | None = None
    """Also save checkpoints/last.ckpt every N optimizer steps (it is saved at every epoch end anyway)."""
    checkpoint_every_minutes: float | None = 30.0
    """Also save checkpoints/last.ckpt every this many minutes of training: at most this much is lost to a
    crash inside a long epoch. null: only at epoch ends and every N steps."""
    async_checkpoint: bool = True
    """Write checkpoints from a background thread: training waits only while the tensors are copied to CPU
    memory (serialising, writing and fsyncing happen beside training)."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """Console progress: auto is the bar on a terminal and a plain line every progress_every_n_steps steps (and
    one per epoch) when stdout is a file, e.g. a SLURM log; bar or lines force one."""
    progress_every_n_steps: int = 50
    """Steps between two progress lines (run.progress lines, or auto in a log file)."""
    resume_allow_changes: str | None = None
    """With --ckpt_path: settings that may differ from the checkpoint's although they change the result, comma-
    separated as the refusal names them (data.batch_size,model.optim.lr), or all. Others are refused."""
    collective_timeout_minutes: float = 10.0
    """A collective (gradient all-reduce, barrier) that waits longer than this for another rank fails, naming
    the rank that does not answer, instead of hanging for torch's default 30 minutes."""


def sections_with_class_path(argv: list[str]) -> set[str]:
    """Which of model/data the command line or its --config files give a class_path for.

    jsonargparse keeps a default class's init_args that are also valid for a newly chosen class
    (so a SequenceModule would inherit the Classifier's default `arch: highway_mlp`); deepres
    therefore sets the default classes only for the sections the user leaves unset."""
    import yaml

    found: set[str] = set()
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        for section in ("model", "data"):
            if key in (f"--{section}", f"--{section}.class_path"):
                found.add(section)
        if key == "--config":
            path = value or (argv[i + 1] if i + 1 < len(argv) else "")
            try:
                loaded = yaml.safe_load(Path(path).read_text())
            except (OSError, yaml.YAMLError):
                continue  # jsonargparse reports unreadable configs itself
            check_config_file(path, loaded)
            for section in ("model", "data"):
                if isinstance(loaded.get(section), dict) and "class_path" in loaded[section]:
                    found.add(section)
    return found


def check_config_file(path: str, loaded: object) -> None:
    """A --config file is a YAML mapping of sections; an empty file or a list at the top level is refused in one
    line (jsonargparse would say "Unexpected config" or fail deep inside)."""
    fix = ("A config file is a YAML mapping of sections (model:, data:, trainer:, ...): start from "
           "`deepres fit --print_config > FILE`, or leave out --config.")
    if loaded is None:
        raise ConfigError(f"--config {path}: the file is empty. {fix}")
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: its top level is a {type(loaded).__name__}, not a mapping. {fix}")


class DeepresCLI(LightningCLI):
    # sections whose default class the user overrides (see sections_with_class_path)
    user_class_paths: set[str] = set()

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        parser.add_class_arguments(WandbConfig, "wandb")
        parser.add_class_arguments(DiagnosticsConfig, "diagnostics")
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.init_args.input_shape", apply_on="instantiate")
        for section, default in (("model", DEFAULT_MODEL), ("data", DEFAULT_DATA)):
            if section not in self.user_class_paths:
                parser.set_defaults({section: {"class_path": default}})
        parser.set_defaults({
            # the default job: 100-layer Highway MLP on the digits, well under 3 minutes on 2 CPU cores
            "trainer.max_epochs": 15,
            "trainer.log_every_n_steps": 10,
            "trainer.deterministic": False,
            # deepres data modules split data across ranks themselves (resumable, see deepres.data.base)
            "trainer.use_distributed_sampler": False,
            "seed_everything": 0,
        })
        _own_options_first(parser, model_class=None if "model" in self.user_class_paths else DEFAULT_MODEL)

    def parse_arguments(self, parser, args) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        printing = [a for a in argv if a.partition("=")[0] == "--print_config"]
        if printing:
            # Printed after parsing, with the architecture's own values where the config leaves a block option
            # unset (`depth: null` is the default net's 100 blocks): the YAML a user edits shows what runs.
            self._parse_or_suggest(parser, [a for a in argv if a not in printing])
            self._print_effective_config(parser, skip_null="skip_null" in printing[0])
            raise SystemExit(0)
        self._parse_or_suggest(parser, args)

    def _print_effective_config(self, parser, *, skip_null: bool) -> None:
        sub = self.config.get("subcommand")
        cfg = self.config[sub] if sub else self.config
        init_args = cfg.get("model", {}).get("init_args") if cfg.get("model") else None
        if init_args is not None:
            build_plan(cfg)  # a printed config is a runnable one: the same checks as a run
            for key, value in effective_model_options(init_args).items():
                if init_args.get(key) is None and key in init_args:
                    init_args[key] = value
        dumped = parser.dump(self.config, skip_none=skip_null)
        loaded = yaml.safe_load(dumped)
        print(yaml.safe_dump(loaded.get(sub, loaded) if sub else loaded, sort_keys=False), end="")

    def _parse_or_suggest(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            # A key that does not exist (or a prefix of one): one line naming it and the nearest valid keys.
            argv = list(sys.argv[1:] if args is None else args)
            sub = getattr(parser, "_subcommands_action", None)
            subparser = sub._name_parser_map.get(argv[0]) if sub is not None and argv else None
            hint = suggest(str(err).split("\n")[0], subparser or parser, argv[1:] if subparser else argv)
            if hint is None:
                raise
            raise ConfigError(f"{hint} Run `deepres {argv[0] if subparser else 'fit'} --help` for the valid options, "
                              "or `--print_config` for the full configuration.") from None

    def _parse_ckpt_path(self) -> None:
        # LightningCLI (2.6) reads the hyper-parameters of an explicit --ckpt_path file here, before any hook:
        # check the file with deepres's loader first, so a crafted one is refused in one line.
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and Path(ckpt).is_file():
            if self.config[sub].get("weights_only") is False:
                return  # a file the user trusts may need more than Lightning's weights-only reader allows
            load_checkpoint(ckpt, mmap=True)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        # Every value and combination checked before a directory, a process or a wandb run exists.
        self.plan = build_plan(cfg)
        self.result_settings = live_settings(self.plan, cfg)
        run = cfg.run
        if not run.name:
            configs = cfg.get("config") or []
            run.name = Path(str(configs[-1])).stem if configs else "default"
        self.trusted = cfg.get("weights_only") is False
        self.run_dir, cfg.ckpt_path = self._choose_run_dir(cfg)
        cfg.trainer.default_root_dir = str(self.run_dir)

    def _choose_run_dir(self, cfg) -> tuple[Path, str | None]:
        """(run directory, checkpoint to resume from): chosen by rank 0, handed to every other rank."""
        run, ckpt = cfg.run, cfg.get("ckpt_path")
        if os.environ.get(ENV_RUN_DIR) and os.environ.get("LOCAL_RANK", "0") != "0":
            # A rank Lightning started beside rank 0 on this machine: rank 0 put its choice in the environment.
            return Path(os.environ[ENV_RUN_DIR]), os.environ.get(ENV_RESUME) or _explicit(ckpt)
        if launch_rank() != 0:  # torchrun / srun started every rank at once: rank 0 writes its choice down
            run_dir, resume_from = await_run_dir(Path(run.root))
            return run_dir, resume_from or _explicit(ckpt)

        job = SlurmJob.current()
        restarted = job is not None and job.restarted
        submitted = job.prepared_run_dir(run.root, run.name) if job else None
        if restarted and submitted is None:  # back to the directory the job's first start claimed (name or name-N)
            submitted = job_run_dir(run.root, run.name, job.job_id)
        resuming = ckpt is not None or (restarted and submitted is not None)
        run_dir = submitted or resolve_run_dir(run.root, run.name, resuming=resuming)
        resume_from = None
        if ckpt in ("last", "auto") or (resuming and ckpt is None):
            resume_from = self._newest_checkpoint(run_dir, ckpt)
        elif ckpt is not None:
            resume_from = self._explicit_checkpoint(ckpt)
        # before anything is written; validate and test only read the weights, at whatever batch size
        if resume_from is not None and Path(resume_from).exists() and self.subcommand in (None, "fit"):
            for change in check_resume(resume_from, self.result_settings, allow=run.resume_allow_changes,
                                       trusted=self.trusted):
                print(f"deepres: resuming with {change} ({ALLOW_OPTION})", file=sys.stderr)
        if resume_from is not None and ckpt in ("last", "auto", None):
            print(f"deepres: resuming from {resume_from} (step {self.resume_step})", file=sys.stderr)
        if submitted is None and not resuming:
            run_dir = claim_new_run_dir(run.root, run.name)
        # A live run in this directory is never written by a second one; a requeued job waits a little for its
        # previous attempt to be stopped.
        lock_run_dir(run_dir, wait_s=60.0 if restarted else 0.0)
        remove_stale_temporaries(run_dir / "checkpoints")
        if restarted:
            print(job.restart_message(resume_from), file=sys.stderr)
        if ckpt == "auto" and resume_from is None and (run_dir / "metrics.csv").exists():
            # Starting over in the same directory: the earlier attempt's rows stay, beside, not mixed in.
            kept = run_dir / f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.csv"
            os.replace(run_dir / "metrics.csv", kept)
            print(f"deepres: --ckpt_path auto: no complete checkpoint in {run_dir}; starting over from step 0 "
                  f"(the earlier metrics.csv is now {kept.name})", file=sys.stderr)
        publish_run_dir(Path(run.root), run_dir, resume_from)
        return run_dir, resume_from

    def _newest_checkpoint(self, run_dir: Path, ckpt: str | None) -> str | None:
        path, step, skipped = find_resume_checkpoint(run_dir, trusted=self.trusted)
        for item in skipped:
            print(f"deepres: {item}", file=sys.stderr)
        if path is not None:
            self.resume_step = step
            return str(path)
        if ckpt == "last":
            raise ConfigError(
                f"--ckpt_path last: no complete checkpoint to resume from ({describe_checkpoints_dir(run_dir)}). "
                "Start a new run without --ckpt_path (it gets a directory of its own), or pass --ckpt_path auto "
                "to start this run over from step 0 in the same directory."
            )
        return None

    def _explicit_checkpoint(self, ckpt: str) -> str:
        if ckpt in ("best", "hpc", "registry") or "://" in ckpt:
            return ckpt  # Lightning's own names and remote paths: Lightning resolves and loads them
        path = Path(ckpt)
        if not path.exists():
            raise ConfigError(f"--ckpt_path {ckpt}: no such file or directory.")
        if (reason := damage(path)) is not None:
            raise ConfigError(f"--ckpt_path {ckpt}: cannot resume from it: {reason}.")
        self.resume_step = checkpoint_global_step(path, trusted=self.trusted)
        return ckpt

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run: RunConfig = cfg.run
        # Strategy names (deepspeed_stage_2, ddp, ...) resolved and the trainer settings checked before
        # anything is written or any rank starts; DeepSpeed also runs on CPU processes this way.
        kwargs["strategy"] = resolve_strategy(
            cfg.trainer, batch_size=getattr(self.datamodule, "batch_size", None),
            timeout=timedelta(minutes=run.collective_timeout_minutes), model=self.model,
        )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # A rank that dies must leave rank 0 time to say which one and where to resume (deepres.training.faults).
        use_patient_process_observer()
        resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        resolved = resolved.get(self.subcommand, resolved) if self.subcommand else resolved
        # LightningCLI builds the Trainer from {**config.trainer, **kwargs}: the parts start from what the user
        # configured (trainer.logger / callbacks / plugins), or setting kwargs would drop it.
        parts = trainer_parts(run=run, wandb=cfg.wandb, diagnostics=cfg.diagnostics, trainer=cfg.trainer,
                              run_dir=self.run_dir, resolved_config=resolved, slurm_job=SlurmJob.current())
        callbacks = [plan_report(self.plan, self.run_dir), ResumeSettings(self.result_settings), *parts.callbacks]
        kwargs.update(logger=parts.loggers, callbacks=callbacks, plugins=parts.plugins)
        self.run_checkpoint = parts.run_checkpoint
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.is_global_zero:
            write_run_info(self.run_dir)
        return trainer

    def before_fit(self) -> None:
        from deepres.data.base import DeepresDataModule

        if isinstance(self.datamodule, DeepresDataModule):
            # deepres data modules skip the batches a mid-epoch checkpoint already trained on
            # (deepres.data.base), so Lightning's warning that the loader cannot resume does not apply.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before")
        if self.config[self.subcommand].get("ckpt_path") and self.trainer.is_global_zero:
            step = getattr(self, "resume_step", None)
            if step is not None:
                truncate_metrics(self.run_dir, after_step=step - 1)

    def after_fit(self) -> None:
        stopped_by = self.run_checkpoint.stopped_by
        if stopped_by is not None:
            raise StoppedBySignal(stopped_by)
        if self.trainer.is_global_zero:
            write_finished(self.run_dir, self.trainer)
            print(f"\ndeepres: run directory {self.run_dir.resolve()}\n"
                  f"  config.yaml, run_info.json, metrics.csv, checkpoints/last.ckpt\n"
                  f"  figures: deepres report {self.run_dir}")


def _own_options_first(parser, model_class: str | None) -> None:
    """`deepres fit --help`: deepres's sections (model, data, run, wandb, diagnostics) before the ~450 lines of
    Trainer options, and the default model's options named in its section (they are parsed through the class,
    so argparse alone would list only --model.help)."""
    from deepres.training.key_suggestions import class_keys

    def dests(group) -> set[str]:
        return {action.dest.split(".")[0] for action in group._group_actions}

    parser.usage = ("deepres fit|validate|test [--config FILE | NAME] [--print_config] [--ckpt_path last | FILE] "
                    "[--SECTION.KEY VALUE ...]\n  sections: model, data, run, wandb, diagnostics, trainer, seed_everything")
    trainer = [g for g in parser._action_groups if dests(g) == {"trainer"}]
    parser._action_groups = [g for g in parser._action_groups if g not in trainer] + trainer
    for group in parser._action_groups:
        names = {action.dest for action in group._group_actions}
        if "model" in names and model_class is not None:
            short = model_class.rsplit(".", 1)[-1]
            options = sorted(k for k in class_keys(model_class) if "." not in k)
            group.title = f"Model: {model_class} unless --model names another class"
            group.description = (f"Its options (each one's help: deepres fit --model.help {short}): "
                                 + ", ".join(f"--model.{k}" for k in options)
                                 + "; the groups --model.optim.*, --model.schedule.*, --model.memory.*")
        elif "data" in names:
            group.title = f"Data: {DEFAULT_DATA} unless --data names another class (--data.help CLASS)"
            group.description = None


class StoppedBySignal(Exception):
    """Training stopped early for SIGTERM / Ctrl-C, after saving last.ckpt."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


def _explicit(ckpt: str | None) -> str | None:
    return None if ckpt in ("last", "auto") else ckpt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:  # "the rest are options of this command", as in `deepres submit ... -- --trainer.max_steps 7`
        argv.remove("--")
    # First thing: inside a SLURM job a requeue signal now requeues it (deepres.slurm.job).
    prepare_process(argv[0] if argv else None)
    quiet_third_party()
    # Called from Python (tests, scripts) with its own argv: that is intended here.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        # A subclass per call: the sections this command line gives a class of its own, without changing
        # DeepresCLI for later calls in the same process (tests and scripts call main() many times).
        cli_class = type("DeepresCLI", (DeepresCLI,), {"user_class_paths": sections_with_class_path(argv)})
        # the help text of a config group's field is the docstring under it (deepres.training.config)
        set_parsing_settings(docstring_parse_attribute_docstrings=True)
        cli_class(
            L.LightningModule, L.LightningDataModule,
            subclass_mode_model=True, subclass_mode_data=True,
            # the optimizer and schedule are the module's `model.optim` / `model.schedule` groups
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "allow_abbrev": False},
            # None: LightningCLI reads sys.argv itself (passing both makes it warn)
            args=None if argv == sys.argv[1:] else argv,
        )
    except StoppedBySignal as stop:
        return 128 + int(getattr(signal, stop.signal_name, signal.SIGTERM))
    except CheckpointWriteError as err:
        if launch_rank() == 0:  # the other ranks stopped with it
            print(f"deepres: error: {err}", file=sys.stderr)
        return 1
    except (ConfigError, ArgumentError, ValueError, TypeError) as e:
        cause = _config_error_in(e)
        if cause is None and not isinstance(e, ArgumentError):
            raise  # a bug, not bad input: keep the traceback
        abandon_unused_claims()
        if cause is not None:
            print(f"deepres: error: {cause}", file=sys.stderr)
            return 2
        print(f"deepres: error: {_first_paragraph(e, argv)}\nRun `deepres {argv[0] if argv else 'fit'} --help` for the valid options, "
              "or `--print_config` for the full configuration.", file=sys.stderr)
        return 2
    except Exception as e:
        report = getattr(e, "deepres_report", None)
        if report is None:
            raise
        print(report, file=sys.stderr)  # the traceback is in the crash log it names
        return 1
    finally:
        abandon_unused_claims()  # a start that failed leaves no directory (one that trained keeps its own)
        release_run_dir_locks()
    return 0


def _config_error_in(exc: BaseException) -> ConfigError | None:
    """jsonargparse wraps errors raised while instantiating classes; find ours in the chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _first_paragraph(exc: BaseException, argv: list[str] | None = None) -> str:
    """One line out of jsonargparse's nested type-check report, naming the key and the fix."""
    import re

    text = str(exc)
    cut = text.find("Traceback (most recent call last)")
    text = (text[:cut] if cut >= 0 else text).strip()
    section = re.match(r'Parser key "([\w.]+)"', text)
    cls = re.search(r"Problem with given class_path '([\w.]+)'", text)
    if not (section and cls):
        return text
    section, cls = section.group(1), cls.group(1)
    rest = text[text.find("Problem with given class_path"):]
    option = (re.search(r"Option '([\w.]+)' is not accepted", rest)
              or re.search(r"unrecognized arguments: --([\w.]+)", rest))
    group = re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", rest)
    if group:  # a key inside a config group (model.init_args.optim.lrr in a YAML file)
        option = re.match(r"(.*)", f"{group.group(1)}.{group.group(2)}")
    if option:
        where = where_in_config(argv or [], f"{section}.init_args.{option.group(1)}") or where_in_config(argv or [], f"{section}.{option.group(1)}")
        return (f"{section}: {cls} has no option {option.group(1)!r}{class_option_hint(section, cls, option.group(1))}{where}. "
                f"See `deepres fit --{section}.help {cls}` for the options it takes.")
    key = re.search(r'Parser key "([\w.]+)"', rest)
    expected = re.findall(r"Expected a <class '([\w.]+)'>", rest)
    given = re.search(r"Given value: (.*)", rest)
    nested = re.search(r"NestedArg\(key='([\w.]+)', val='([^']*)'\)", rest)
    if nested and (hint := choice_hint(section, cls, nested.group(1), nested.group(2))):
        return hint
    if key and given and (hint := choice_hint(section, cls, key.group(1), given.group(1).strip("'\""))):
        return hint
    if key:
        return (f"{section}.{key.group(1)}: {given.group(1) if given else 'value'!r} is not a valid value"
                f"{' (expected ' + ' or '.join(dict.fromkeys(expected)) + ')' if expected else ''}.")
    return text
