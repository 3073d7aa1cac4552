"""SIGTERM and Ctrl-C during training: finish the step, save a checkpoint, stop.

What sends them: ``scancel`` without ``--signal`` (SIGTERM to every task, SIGKILL ``KillWait`` seconds later,
30 s by default), a preempting scheduler, ``kill``, ``docker stop``, torchrun forwarding its own SIGTERM/SIGINT,
and Ctrl-C in a terminal (SIGINT to every process in the foreground group: all ranks of a local launch).

While training runs (``arm()`` .. ``disarm()``), the handler only records the signal; ``RunCheckpoint``
(deepres.training.run_checkpoint) agrees on it across ranks at the next optimizer step, saves ``last.ckpt``
and stops the Trainer. A second Ctrl-C stops at once (KeyboardInterrupt). Outside training the default action
applies: there is nothing to save.

Why not Lightning's SIGTERM handling: its handler kills the other local ranks and broadcasts inside the
signal handler, so the step in flight and everything since the last checkpoint are lost.

Standard library only: importable before torch.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_pending: str | None = None
_previous: dict[int, Any] = {}


def _say(message: str) -> None:
    # os.write, not print: a signal handler must not re-enter a buffered stream the interrupted code was using.
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("LOCAL_RANK") or "0"
    os.write(2, f"[deepres rank {rank}] {message}\n".encode())


def _on_stop_signal(signum: int, _frame: object) -> None:
    global _pending
    name = signal.Signals(signum).name
    if _pending is not None:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, unsaved
        return
    _pending = name
    hint = " (Ctrl-C again to stop at once, unsaved)" if signum == signal.SIGINT else ""
    _say(f"{name}: saving a checkpoint at the end of this step, then stopping{hint}")


def arm() -> bool:
    """Record SIGTERM/SIGINT from now on instead of dying. Main thread only; returns whether armed."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        return False
    _pending = None
    for sig in STOP_SIGNALS:
        previous = signal.signal(sig, _on_stop_signal)
        if previous is not _on_stop_signal:
            _previous[sig] = previous
    return True


def disarm() -> None:
    """Give the signals back to what handled them before ``arm()``."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, previous in list(_previous.items()):
        if signal.getsignal(sig) is _on_stop_signal:
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        del _previous[sig]


def ignore_sigterm() -> None:
    """Ignore SIGTERM (main thread only) in a process that has saved and is about to end anyway, until the
    Trainer's teardown restores the handlers it found: after a requeue the scheduler's SIGTERM would otherwise
    reach Lightning's handler, which broadcasts to ranks that may be gone, and read as a crash in the log."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stopped_training(trainer: Any) -> bool:
    """Whether a stop signal (or a requeue) ended this fit: RunCheckpoint (deepres.training.run_checkpoint) records
    it as `stopped_by`. What an uninterrupted run would not log at that point is then left to the resumed run."""
    return any(getattr(callback, "stopped_by", None) for callback in trainer.callbacks)


def pending() -> str | None:
    """The name of the stop signal that arrived and is not handled yet (SIGTERM, SIGINT), else None."""
    return _pending


def clear() -> None:
    global _pending
    _pending = None
