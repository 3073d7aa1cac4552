"""A callback that sends this process a signal after a chosen optimizer step, for resume tests.

    deepres fit ... --trainer.callbacks+=_signal_at_step.SignalAtStep --trainer.callbacks.step=30

The signal goes through the same handler as one sent from outside (deepres.training.stop_signals), so the run
saves last.ckpt at that step boundary and stops, exactly as after `kill -TERM` or Ctrl-C, but at a step chosen
in advance: the test can place it inside an epoch.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class SignalAtStep(Callback):
    def __init__(self, step: int, signal_name: str = "SIGTERM") -> None:
        self.step = step
        self.signal = signal.Signals[signal_name]
        self.sent = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getpid(), self.signal)
