"""Everything deepres takes from Lightning beyond its public API, in one place.

Each entry names the internal, why no public way does the job, and where deepres uses it.
``tests/test_lightning_compat.py`` checks every one against the installed Lightning and fails naming the
Lightning version when one has moved; ``pyproject.toml`` pins Lightning to the minor version those tests ran
on (``TESTED_WITH``). Anything not listed here uses Lightning's public API only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import lightning
import lightning.pytorch.strategies.launchers.subprocess_script as _pl_subprocess_launcher
from lightning.fabric.connector import _convert_precision_to_unified_args
from lightning.fabric.loggers.logger import _DummyExperiment
from lightning.fabric.strategies.deepspeed import _DEEPSPEED_AVAILABLE, _is_deepspeed_checkpoint
from lightning.fabric.utilities.device_parser import _select_auto_accelerator
from lightning.fabric.utilities.types import _PATH

TESTED_WITH = "2.6"
VERSION = lightning.__version__

# ------------------------------------------------------------------------------------ names and helpers
#: Type of a checkpoint path as Lightning's CheckpointIO takes it (str, Path, or a remote URL).
PathLike = _PATH
#: What a logger's ``experiment`` returns on ranks other than 0 (deepres.observability.wandb_logging falls back to it when
#: wandb cannot start, so that training goes on).
DummyExperiment = _DummyExperiment


def unified_precision(precision: Any) -> str | None:
    """"bf16" → "bf16-mixed", 16 → "16-mixed", …: Lightning's own normalisation of ``trainer.precision``, so that
    deepres's checks (deepres.strategies) see what the Trainer will run."""
    return _convert_precision_to_unified_args(precision)


def auto_accelerator() -> str:
    """The accelerator ``accelerator="auto"`` resolves to on this machine (cuda, mps, tpu or cpu)."""
    return _select_auto_accelerator()


def deepspeed_available() -> bool:
    return bool(_DEEPSPEED_AVAILABLE)


def is_deepspeed_checkpoint(path: Any) -> bool:
    """Whether a directory is a ZeRO checkpoint as Lightning's DeepSpeed strategy writes it."""
    return bool(_is_deepspeed_checkpoint(path))


def should_update_logs(trainer: Any) -> bool:
    """Whether Lightning writes step-level logs after this training step (``log_every_n_steps``, the last step).
    deepres computes step metrics only then (deepres.training.module); Lightning exposes the test only on its
    logger connector."""
    return bool(trainer._logger_connector.should_update_logs)


def batches_done_in_epoch(trainer: Any) -> int:
    """Batches of the current epoch that a restored checkpoint has already trained on (0 unless restarting).
    deepres's data modules skip them on resume (deepres.data.base); the loop progress is Lightning's record."""
    loop = trainer.fit_loop
    if not loop.restarting:
        return 0
    return int(loop.epoch_loop.batch_progress.current.processed)


def start_epoch_after_a_last_batch_restore(trainer: Any) -> None:
    """Call in ``on_train_start``. Resuming from a checkpoint saved in ``on_train_batch_end`` of an epoch's last
    batch (a signal, ``max_steps`` or every-N-steps save landing there), Lightning (2.6) marks that epoch processed
    and completed in its reset but keeps the stage "restarted mid-epoch", so the next epoch starts without its
    ``ready``/``started`` counts and without ``on_train_epoch_start`` hooks. A checkpoint saved inside that next
    epoch then reads as one from a finished epoch: resuming from it is no restart, and the epoch is trained again
    from its first batch. Clearing the stage starts the next epoch as any other."""
    loop = trainer.fit_loop
    progress = loop.epoch_progress.current
    if loop.restarted_mid_epoch and progress.ready == progress.processed == progress.completed:
        loop.reset_restart_stage()


def at_the_epochs_last_batch(trainer: Any) -> bool:
    """Whether the batch just trained was the last of its epoch (in ``on_train_epoch_end``: whether the epoch ran
    to its end, or a stop cut it short). Lightning keeps the flag on its epoch loop's batch progress."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def validates_after_this_batch(trainer: Any) -> bool:
    """Whether Lightning runs validation after the current training batch on its own schedule (the epoch's end,
    ``val_check_interval``), leaving out the extra validation it adds whenever the Trainer's ``should_stop`` flag is set.
    deepres.training.run_checkpoint stops for a signal without that extra one; Lightning exposes the test only
    on its epoch loop."""
    loop = trainer.fit_loop.epoch_loop
    stop, trainer.should_stop = trainer.should_stop, False
    try:
        return bool(loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    finally:
        trainer.should_stop = stop


def wandb_init_arguments(logger: Any) -> dict[str, Any]:
    """The keyword arguments Lightning's WandbLogger will pass to ``wandb.init`` (deepres drops ``anonymous``,
    which wandb >= 0.19 warns about)."""
    return logger._wandb_init


# ------------------------------------------------------------------------------------------- replacements
#: How long rank 0 gets to write its own fault report after a rank it started has died (deepres.training.faults),
#: before every rank is stopped from outside.
PEER_EXIT_GRACE_S = 30.0


class PatientProcessObserver(threading.Thread):
    """Lightning's launcher watches the ranks it starts and, within 5 s of one dying, SIGKILLs every rank including
    rank 0 itself (``_ChildProcessObserver``): that races rank 0's fault report (which rank died, which checkpoint to
    resume from) and, when it wins, the job ends with -9 and no word. This observer lets rank 0 end on its own for
    ``grace_s`` first; only a rank 0 that still has not ended (a collective that never notices the dead peer) is
    stopped, with a line that says why."""

    def __init__(self, child_processes: list[subprocess.Popen], main_pid: int, grace_s: float = PEER_EXIT_GRACE_S,
                 poll_s: float = 1.0) -> None:
        super().__init__(daemon=True, name="deepres-rank-observer")  # stops with the main process
        self.child_processes, self.main_pid, self.grace_s, self.poll_s = child_processes, main_pid, grace_s, poll_s

    def run(self) -> None:
        first_failure: float | None = None
        while True:
            time.sleep(self.poll_s)
            codes = [proc.poll() for proc in self.child_processes]
            if all(code == 0 for code in codes):
                return
            failed = [(rank, proc, code) for rank, (proc, code) in enumerate(zip(self.child_processes, codes, strict=True), 1) if code]
            if not failed:
                continue
            first_failure = first_failure or time.monotonic()
            if time.monotonic() - first_failure < self.grace_s:
                continue
            rank, proc, code = failed[0]
            print(f"deepres: rank {rank} (pid {proc.pid}) exited with code {code} and rank 0 did not stop within "
                  f"{self.grace_s:g} s: stopping every rank. Resume with the same command plus --ckpt_path last.",
                  file=sys.stderr, flush=True)
            for other in self.child_processes:
                if other.poll() is None:
                    other.send_signal(signal.SIGKILL)
            os.kill(self.main_pid, signal.SIGKILL)
            return


def use_patient_process_observer(grace_s: float = PEER_EXIT_GRACE_S) -> None:
    """Make Lightning's subprocess launcher (DDP and DeepSpeed started by ``deepres fit`` itself) watch its ranks with
    ``PatientProcessObserver``. Lightning exposes no option for its observer; it calls the module-level
    ``_launch_process_observer`` in ``lightning.pytorch.strategies.launchers.subprocess_script``, which this
    replaces. Used by deepres.training.cli."""
    def launch(child_processes: list[subprocess.Popen]) -> None:
        PatientProcessObserver(child_processes, main_pid=os.getpid(), grace_s=grace_s).start()

    _pl_subprocess_launcher._launch_process_observer = launch


# ------------------------------------------------------------------------------------------- overrides
#: Private methods and attributes deepres subclasses override or reads on its own subclasses:
#: (class, attribute, its parameters or None for an attribute, where and why).
OVERRIDES: list[tuple[str, str, tuple[str, ...] | None, str]] = [
    ("lightning.pytorch.cli.LightningCLI", "_parse_ckpt_path", ("self",),
     "deepres.training.cli: check an explicit --ckpt_path file with deepres's loader before Lightning reads its "
     "hyper-parameters"),
    ("lightning.pytorch.callbacks.TQDMProgressBar", "_should_update", ("self", "current", "total"),
     "deepres.training.progress: redraw by time, not by step count"),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "_check_log_dir_exists", ("self",),
     "deepres.training.run_dir: keep metrics.csv across resumes (Lightning's writer deletes it)"),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "_fs", None, "deepres.training.run_dir: the same"),
    ("lightning.pytorch.loggers.CSVLogger", "_experiment", None, "deepres.training.run_dir: the same"),
    ("lightning.pytorch.loggers.WandbLogger", "_experiment", None,
     "deepres.observability.wandb_logging: the run, to finish it and print the sync command"),
    ("lightning.pytorch.strategies.DeepSpeedStrategy", "_setup_model_and_optimizer",
     ("self", "model", "optimizer", "lr_scheduler"),
     "deepres.strategies: Lightning's body with a CPU device argument (DeepSpeed on CPU processes)"),
    ("lightning.pytorch.strategies.DeepSpeedStrategy", "_initialize_deepspeed_inference", ("self", "model"),
     "deepres.strategies: the same, for validation"),
    ("lightning.pytorch.strategies.DeepSpeedStrategy", "_init_deepspeed_distributed", ("self",),
     "deepres.strategies: the process group on CPU processes, without Lightning's device-index check"),
    ("lightning.pytorch.loggers.CSVLogger", "_fs", None, "deepres.training.run_dir: create the run directory"),
]


def gather_from_ranks(trainer: Any, mine: Any) -> list[Any]:
    """Every rank's `mine`, indexed by global rank (a collective when the run has several processes: call it
    where every rank does, as in writing a checkpoint). Lightning writes a checkpoint from rank 0 only, so
    per-rank state (random generators, data-stream positions) reaches the file this way."""
    import torch.distributed as dist

    if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _row(trainer: Any, logged: dict[str, Any], default_step: int) -> tuple[int, dict[str, Any]] | None:
    """(step, values) as Lightning's logger connector writes `logged` (``log_metrics``): scalars, the step a
    logged `step` value gives or `default_step`, and the epoch added."""
    from lightning.fabric.utilities.apply_func import convert_tensors_to_scalars

    values = convert_tensors_to_scalars(dict(logged))
    if not values:
        return None
    step = values.pop("step", None)
    values.setdefault("epoch", trainer.current_epoch)
    return (int(step) if step is not None else default_step), values


def step_row_due(trainer: Any) -> tuple[int, dict[str, Any]] | None:
    """The metrics row Lightning writes after this training step, as (step, values), or None when it writes
    none. Called in ``on_train_batch_end``: Lightning writes the row after those hooks (2.6,
    ``_TrainingEpochLoop.advance``), from the same values."""
    if not should_update_logs(trainer):
        return None
    return _row(trainer, trainer._logger_connector.metrics["log"], int(trainer.fit_loop.epoch_loop._batches_that_stepped))


def epoch_row_due(trainer: Any) -> tuple[int, dict[str, Any]] | None:
    """The epoch-level metrics row Lightning writes after ``on_train_epoch_end`` (2.6, ``_FitLoop.on_advance_end``:
    the values logged with ``on_epoch=True``, at the epoch's last step), as (step, values); None when it writes
    none. Called in ``on_train_epoch_end`` of a checkpoint callback, which Lightning runs after the module's."""
    return _row(trainer, trainer._results.metrics(False)["log"], int(trainer.fit_loop.epoch_loop._batches_that_stepped) - 1)
