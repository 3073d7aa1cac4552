"""The loggers, callbacks and plugins of a `deepres fit` Trainer, assembled in one place.

What the user configured under ``trainer.logger`` / ``trainer.callbacks`` / ``trainer.plugins`` is kept; deepres
adds, in this order (the order Lightning runs their hooks in, except that it runs checkpoint callbacks last):

loggers    RunCSVLogger (metrics.csv, always: `deepres report` reads it), then wandb unless ``trainer.logger: false``
callbacks  RunCheckpoint (last.ckpt on its schedule, and on signals), RandomGenerators (every rank's random
           generators in each checkpoint), FaultReport (which rank failed), SkippedSampleCounts (corrupt samples per reason), the depth diagnostics, the throttled progress bar
           (unless the user has a bar or turned it off)
plugins    the checkpoint writer (atomic, previous.ckpt kept, in a background thread unless
           ``run.async_checkpoint: false``), and inside a SLURM job Lightning's SLURM environment
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, ProgressBar

from deepres.observability.diagnostics import diagnostics_callbacks
from deepres.observability.wandb_logging import make_wandb_logger
from deepres.slurm.job import SlurmJob
from deepres.training.checkpoints import BackgroundCheckpointFiles, CheckpointFiles, find_resume_checkpoint
from deepres.training.faults import FaultReport
from deepres.training.progress import progress_callback
from deepres.training.rng_state import RandomGenerators
from deepres.training.run_checkpoint import RunCheckpoint
from deepres.training.run_dir import RunCSVLogger, run_info
from deepres.training.skipped_samples import SkippedSampleCounts


@dataclass
class TrainerParts:
    loggers: list[Any]
    callbacks: list[Callback]
    plugins: list[Any]
    run_checkpoint: RunCheckpoint


def as_list(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def trainer_parts(*, run: Any, wandb: Any, diagnostics: Any, trainer: Any, run_dir: Path,
                  resolved_config: dict[str, Any], slurm_job: SlurmJob | None) -> TrainerParts:
    """`run`, `wandb`, `diagnostics`: the CLI's config sections; `trainer`: the Trainer's arguments as configured;
    `resolved_config`: the whole configuration, for the wandb run's config."""
    user_logger = trainer.get("logger")
    loggers: list[Any] = [RunCSVLogger(run_dir)]
    if user_logger not in (None, True, False):
        loggers += as_list(user_logger)
    if user_logger is not False:  # `trainer.logger: false` turns wandb off, the CSV log stays
        wandb_logger = make_wandb_logger(wandb, run_dir, {**resolved_config, "run_info": run_info()})
        loggers += [wandb_logger] if wandb_logger else []

    requeue, slurm_plugins = slurm_job.requeue_policy_and_plugins() if slurm_job else (None, [])
    # Always, beside any ModelCheckpoint of the user's (top-k by a metric): last.ckpt is what resumes.
    run_checkpoint = RunCheckpoint(run_dir / "checkpoints", every_n_steps=run.checkpoint_every_n_steps,
                                   every_minutes=run.checkpoint_every_minutes, requeue=requeue)
    callbacks = [*as_list(trainer.get("callbacks")), run_checkpoint, RandomGenerators(),
                 FaultReport(run_dir, newest_checkpoint=lambda: find_resume_checkpoint(run_dir)[:2]),
                 SkippedSampleCounts(), *diagnostics_callbacks(diagnostics, run_dir)]
    if trainer.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
        # A bar on a terminal, plain lines in a log file (deepres.training.progress)
        callbacks.append(progress_callback(getattr(run, "progress", "auto"), getattr(run, "progress_every_n_steps", 50)))

    plugins = [*as_list(trainer.get("plugins")),
               BackgroundCheckpointFiles() if run.async_checkpoint else CheckpointFiles(),
               *slurm_plugins]
    return TrainerParts(loggers, callbacks, plugins, run_checkpoint)
