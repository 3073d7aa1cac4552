"""Progress on the console: a bar on a terminal, a plain line every N steps in a log file.

``progress_callback(mode, every_n_steps)`` picks one (``run.progress``, ``run.progress_every_n_steps``):

    auto   the bar when stdout is a terminal, else the lines (a SLURM log, ``deepres fit > log``)
    bar    ThrottledProgressBar: Lightning's TQDM bar, redrawn a few times per second
    lines  ProgressLines: one line every N optimizer steps and one per epoch, nothing else

A carriage-return bar in a file is one very long line per epoch that ``tail`` and ``grep`` cannot read.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from typing import Any

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar


class ThrottledProgressBar(TQDMProgressBar):
    """Redraws at most every `min_interval` seconds, and always at the end of a loop.

    Lightning's bar redraws every `refresh_rate` steps, formatting all progress-bar metrics each time:
    about 1.7 ms per step, 7 % of the default job's 24 ms step (cProfile). A fixed step count cannot be
    right for both 20 ms and 2 s steps; a time limit is (tqdm's own default is 0.1 s).
    """

    def __init__(self, min_interval: float = 0.2, process_position: int = 0, leave: bool = False):
        super().__init__(refresh_rate=1, process_position=process_position, leave=leave)
        self.min_interval = min_interval
        self._last_draw = -float("inf")

    def _should_update(self, current: int, total: int) -> bool:
        if not super()._should_update(current, total):
            return False
        now = time.monotonic()
        if current == total or now - self._last_draw >= self.min_interval:
            self._last_draw = now
            return True
        return False


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


def _composite_gain(trainer: Any) -> str:
    """Multi-stream blocks: the smallest and largest column sum of ∏H^res over all blocks (1 and 1 while it
    stays doubly stochastic) at the depth diagnostics' latest measured step; empty without them."""
    for callback in trainer.callbacks:
        gain = getattr(callback, "latest_composite", None)
        if gain:
            return (f"  ∏H^res col sums {gain['hyper/composite/min_col_sum']:.4g}-"
                    f"{gain['hyper/composite/max_col_sum']:.4g}")
    return ""


class ProgressLines(ProgressBar):
    """A line every ``every_n_steps`` optimizer steps and one at the end of every epoch, on rank 0:

        [deepres] epoch 5/15  step 100/330  train/loss=0.08185 train/acc1=1  9.72 steps/s  0:00:10 elapsed, 0:00:23 left
        [deepres] epoch 5/15 done  step 110/330  val/acc1=0.9611

    With multi-stream blocks (gate hc, mhc, mhc_lite) a step's line also shows ∏H^res's column sums, as the
    depth diagnostics last measured them (`  ∏H^res col sums 0.9987-1.002`).

    The metrics are the progress-bar metrics (what the bar would show); they are formatted only on the steps
    that print, so the lines cost nothing in between.
    """

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps}: give a positive number of steps")
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._start = 0.0
        self._start_step = 0
        self._printed_step = -1

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _say(self, text: str) -> None:
        print(f"[deepres] {text}", flush=True)

    def _epochs(self, trainer: Any) -> str:
        total = trainer.max_epochs  # counted from 1 here: "epoch 15/15 done" is the last one
        return f"epoch {trainer.current_epoch + 1}" + (f"/{total}" if total not in (None, -1) else "")

    def _steps(self, trainer: Any) -> str:
        total = trainer.estimated_stepping_batches
        known = isinstance(total, int) or (isinstance(total, float) and total != float("inf"))
        return f"step {trainer.global_step}" + (f"/{int(total)}" if known else "")

    def _metrics(self, trainer: Any, pl_module: Any, prefix: str) -> str:
        items = self.get_metrics(trainer, pl_module)
        shown = []
        for key, value in items.items():
            if not key.startswith(prefix):
                continue
            shown.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        return " ".join(shown)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._start, self._start_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self._enabled or step % self.every_n_steps or step == self._printed_step or step == 0:
            return
        self._printed_step = step
        elapsed = time.monotonic() - self._start
        rate = (step - self._start_step) / elapsed if elapsed > 0 else 0.0
        line = f"{self._epochs(trainer)}  {self._steps(trainer)}  {self._metrics(trainer, pl_module, 'train/')}"
        line += _composite_gain(trainer)
        line += f"  {rate:.3g} steps/s  {_clock(elapsed)} elapsed"
        total = trainer.estimated_stepping_batches
        if rate > 0 and isinstance(total, (int, float)) and total != float("inf"):
            line += f", {_clock(max(total - step, 0) / rate)} left"
        self._say(line)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._enabled:
            metrics = self._metrics(trainer, pl_module, "val/") or self._metrics(trainer, pl_module, "train/")
            last = getattr(pl_module, "last_train_loss", None)
            if not metrics and last is not None:  # ended before its first logged step
                metrics = f"train/loss={last:.4g}"
            self._say(f"{self._epochs(trainer)} done  {self._steps(trainer)}  {metrics}")


def progress_callback(mode: str = "auto", every_n_steps: int = 50, stream: Any = None) -> ProgressBar:
    """The progress callback for ``run.progress`` (see the module docstring)."""
    if mode not in ("auto", "bar", "lines"):
        from deepres.errors import ConfigError

        raise ConfigError(f"run.progress {mode!r}: use auto, bar or lines (or trainer.enable_progress_bar false).")
    if mode == "auto":
        stream = sys.stdout if stream is None else stream
        mode = "bar" if getattr(stream, "isatty", lambda: False)() else "lines"
    return ThrottledProgressBar() if mode == "bar" else ProgressLines(every_n_steps)
