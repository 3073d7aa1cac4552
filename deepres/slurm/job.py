"""Everything `deepres fit` does differently inside a SLURM job, behind one object.

    job = prepare_process("fit")          # first thing in the process: None outside SLURM
    job.prepared_run_dir(root, name)      # the run directory `deepres submit` prepared, if any
    job.restarted, job.restart_message()  # a requeued job resumes; the log says from where
    job.requeue_policy_and_plugins()      # for the Trainer (deepres.training.assembly)

Standard library only at import time (the requeue signal must be handled before torch is imported).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepres.slurm import requeue


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    restart: int

    @classmethod
    def current(cls) -> SlurmJob | None:
        """This process's SLURM batch job, or None (not in SLURM, or an interactive allocation)."""
        if not requeue.in_slurm_job():
            return None
        return cls(job_id=requeue.slurm_job_id(), restart=requeue.restart_count())

    @property
    def restarted(self) -> bool:
        return self.restart > 0

    def prepared_run_dir(self, root: str | os.PathLike[str], name: str) -> Path | None:
        return requeue.submitted_run_dir(root, name)

    def restart_message(self, resumed_from: os.PathLike[str] | str | None) -> str:
        return requeue.restart_message(resumed_from)

    def requeue_policy_and_plugins(self) -> tuple[Any, list[Any]]:
        from deepres.slurm.callback import (
            slurm_requeue_and_plugins,  # Lightning: only once a Trainer is built
        )

        return slurm_requeue_and_plugins()


def prepare_process(subcommand: str | None) -> SlurmJob | None:
    """Call first thing in a deepres command (idempotent). Inside a SLURM job: from now on the requeue signal
    requeues the job instead of killing it (for `fit`), and the submitting process's wandb service is forgotten:
    sbatch exports the submitter's environment, and with it WANDB_SERVICE, the address of a service on another
    machine or one where a killed attempt's run id is still registered ("run ID ... is in use")."""
    job = SlurmJob.current()
    if job is None:
        return None
    if subcommand == "fit":
        requeue.install_early_signal_handler()
    os.environ.pop("WANDB_SERVICE", None)
    return job
