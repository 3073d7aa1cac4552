"""`deepres fit | validate | test`: LightningCLI with deepres's defaults and run directories.

    deepres fit                                     # the built-in default: 100-layer Highway MLP on digits
    deepres fit --config configs/resnet110_cifar10.yaml --data.data_dir ~/data/cifar
    deepres fit --model.depth 1000 --trainer.max_epochs 5
    deepres fit --name my-run --ckpt_path last      # resume the newest run called my-run
    deepres fit --print_config                      # the full resolved configuration

Outputs go to `<run.root>/<run.name>/`: config.yaml, run_info.json, metrics.csv, checkpoints/.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

from deepres.diagnostics import DiagnosticsConfig, diagnostics_callbacks
from deepres.errors import ConfigError
from deepres.slurm import requeue
from deepres.slurm.callback import slurm_callbacks_and_plugins
from deepres.strategies import checkpoint_global_step, resolve_strategy
from deepres.training.progress import ThrottledProgressBar
from deepres.training.run_dir import (
    AtomicCheckpointIO,
    RunCheckpoint,
    RunCSVLogger,
    resolve_run_dir,
    truncate_metrics,
    write_run_info,
)
from deepres.wandb_logging import WandbConfig, make_wandb_logger

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
    """Also save checkpoints/last.ckpt every N optimizer steps (default: at every epoch end only)."""


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
                loaded = yaml.safe_load(Path(path).read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue  # jsonargparse reports unreadable configs itself
            for section in ("model", "data"):
                if isinstance(loaded.get(section), dict) and "class_path" in loaded[section]:
                    found.add(section)
    return found


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

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run = cfg.run
        if not run.name:
            configs = cfg.get("config") or []
            run.name = Path(str(configs[-1])).stem if configs else "default"
        resuming = bool(cfg.get("ckpt_path")) or requeue.restart_count() > 0
        self.run_dir = resolve_run_dir(run.root, run.name, resuming=resuming)
        # --- deepres.slurm (issue 6): a submitted job keeps the run directory `deepres submit` prepared;
        # a requeued job resumes from that run's newest complete checkpoint.
        self.run_dir = requeue.submitted_run_dir(run.root, run.name) or self.run_dir
        if (resume := requeue.resume_checkpoint(self.run_dir)) is not None:
            cfg.ckpt_path = str(resume)
        # --- end deepres.slurm
        cfg.trainer.default_root_dir = str(self.run_dir)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        cfg = self.config_init[self.subcommand] if self.subcommand else self.config_init
        run: RunConfig = cfg.run
        # Strategy names (deepspeed_stage_2, ddp, ...) resolved and the trainer settings checked before
        # anything is written or any rank starts; DeepSpeed also runs on CPU processes this way.
        kwargs["strategy"] = resolve_strategy(cfg.trainer, batch_size=getattr(self.datamodule, "batch_size", None))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        trainer_cfg = cfg.trainer
        # LightningCLI builds the Trainer from {**config.trainer, **kwargs}: start from what the user
        # configured (trainer.logger / trainer.callbacks), or setting kwargs would drop it.
        user_logger = trainer_cfg.get("logger")
        loggers = [RunCSVLogger(self.run_dir)]  # always: metrics.csv is what `deepres report` reads
        if user_logger not in (None, True, False):
            loggers += _as_list(user_logger)
        if user_logger is not False:  # `trainer.logger: false` turns wandb off, CSV stays
            resolved = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            resolved = resolved.get(self.subcommand, resolved) if self.subcommand else resolved
            wandb_logger = make_wandb_logger(cfg.wandb, self.run_dir, resolved)
            loggers += [wandb_logger] if wandb_logger else []
        kwargs["logger"] = loggers
        callbacks = _as_list(trainer_cfg.get("callbacks"))
        if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
            callbacks.append(RunCheckpoint(
                dirpath=self.run_dir / "checkpoints", save_last=True, save_top_k=0,
                every_n_train_steps=run.checkpoint_every_n_steps,
            ))
        callbacks += diagnostics_callbacks(cfg.diagnostics, self.run_dir)
        if trainer_cfg.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(ThrottledProgressBar())
        kwargs["callbacks"] = callbacks
        plugins = _as_list(trainer_cfg.get("plugins"))
        plugins.append(AtomicCheckpointIO())
        # --- deepres.slurm (issue 6): checkpoint + requeue on SIGUSR1; Lightning's own requeue off
        slurm_callbacks, slurm_plugins = slurm_callbacks_and_plugins()
        callbacks += slurm_callbacks
        plugins += slurm_plugins
        # --- end deepres.slurm
        kwargs["plugins"] = plugins
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
        ckpt = self.config[self.subcommand].get("ckpt_path")
        if ckpt and self.trainer.is_global_zero:
            path = self.trainer.checkpoint_callback.dirpath and Path(self.trainer.checkpoint_callback.dirpath) / "last.ckpt"
            path = path if ckpt == "last" else Path(ckpt)
            if path and path.exists():
                step = checkpoint_global_step(path)  # a file, or a ZeRO checkpoint directory
                truncate_metrics(self.run_dir, after_step=step - 1)

    def after_fit(self) -> None:
        if self.trainer.is_global_zero:
            print(f"\ndeepres: run directory {self.run_dir.resolve()}\n"
                  f"  config.yaml, run_info.json, metrics.csv, checkpoints/last.ckpt\n"
                  f"  figures: deepres report {self.run_dir}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # deepres.slurm (issue 6): first thing, so a requeue signal before training requeues the job
    if argv[:1] == ["fit"]:
        requeue.install_early_signal_handler()
    # Called from Python (tests, scripts) with its own argv: that is intended here.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    DeepresCLI.user_class_paths = sections_with_class_path(argv)
    try:
        DeepresCLI(
            L.LightningModule, L.LightningDataModule,
            subclass_mode_model=True, subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False},
            # None: LightningCLI reads sys.argv itself (passing both makes it warn)
            args=None if argv == sys.argv[1:] else argv,
        )
    except (ConfigError, ArgumentError, ValueError, TypeError) as e:
        cause = _config_error_in(e)
        if cause is None and not isinstance(e, ArgumentError):
            raise  # a bug, not bad input: keep the traceback
        if cause is not None:
            print(f"deepres: error: {cause}", file=sys.stderr)
            return 2
        print(f"deepres: error: {_first_paragraph(e)}\nRun `deepres {argv[0] if argv else 'fit'} --help` for the valid options, "
              "or `--print_config` for the full configuration.", file=sys.stderr)
        return 2
    return 0


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _config_error_in(exc: BaseException) -> ConfigError | None:
    """jsonargparse wraps errors raised while instantiating classes; find ours in the chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _first_paragraph(exc: BaseException) -> str:
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
    option = re.search(r"Option '([\w.]+)' is not accepted", rest)
    if option:
        return (f"{section}: {cls} has no option {option.group(1)!r}. "
                f"See `deepres fit --{section}.help {cls}` for the options it takes.")
    key = re.search(r'Parser key "([\w.]+)"', rest)
    expected = re.findall(r"Expected a <class '([\w.]+)'>", rest)
    given = re.search(r"Given value: (.*)", rest)
    if key:
        return (f"{section}.{key.group(1)}: {given.group(1) if given else 'value'!r} is not a valid value"
                f"{' (expected ' + ' or '.join(dict.fromkeys(expected)) + ')' if expected else ''}.")
    return text
