"""A callback that SIGKILLs one rank inside a checkpoint save, for the DDP fault tests.

    deepres fit ... --trainer.callbacks+=_die_while_saving.DieWhileSaving --trainer.callbacks.step=8

At the chosen step, the rank dies after its part of the checkpoint (the collectives that gather every rank's
state) and before the barrier that ends the save: rank 0 has written the checkpoint and waits at that barrier
for a rank that is gone, so nothing rank 0 would do after the save at this step (writing the step's metrics
row) happens before the job ends. A kill at a random moment lands there now and then; this places it there.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class DieWhileSaving(Callback):
    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.global_rank != self.rank:
            return
        barrier = trainer.strategy.barrier

        def dying_barrier(name: str | None = None, *args, **kwargs):
            if name == "Trainer.save_checkpoint" and trainer.global_step == self.step:
                os.kill(os.getpid(), signal.SIGKILL)
            return barrier(name, *args, **kwargs)

        trainer.strategy.barrier = dying_barrier
