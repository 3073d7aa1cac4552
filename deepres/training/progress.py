"""Lightning's TQDM progress bar, redrawn a few times per second instead of after every step."""

from __future__ import annotations

import time

from lightning.pytorch.callbacks import TQDMProgressBar


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
