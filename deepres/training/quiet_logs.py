"""Third-party messages that do not apply to a deepres run, kept out of its log.

Each entry says why it does not apply; anything not listed here (real warnings, the model summary, "GPU
available: ..., used: ...") stays. ``quiet_third_party()`` is called once by ``deepres fit`` before the
Trainer is built; it installs warning filters and one logging filter on the handlers Lightning prints through.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

# (warning message regex, why it does not apply)
WARNINGS: list[tuple[str, str]] = [
    (r"The `srun` command is available on your system but is not used",
     "deepres jobs are started by `deepres submit`, whose script runs srun; on a login node the hint is wrong"),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "raised by Lightning's own code against torch's pytree API; nothing a user can change"),
]
# (Lightning info message prefix, why it does not apply)
INFO_LINES: list[tuple[str, str]] = [
    ("💡 Tip:", "an advertisement for Lightning's cloud loggers (printed for every fit)"),
    ("TPU available: False", "deepres runs on CPUs and CUDA GPUs; the GPU line stays"),
    ("Loading `train_dataloader` to estimate number of stepping batches", "an internal step of the lr schedule"),
    ("`weights_only` was not set", "deepres checkpoints always hold the full training state (resume)"),
]
_INFO = re.compile("|".join(re.escape(prefix) for prefix, _ in INFO_LINES))


class _DropInfoLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and _INFO.match(str(record.getMessage())))


_FILTER = _DropInfoLines()


# (environment variable, value, why): read by C++ libraries when they first start, so set before anything runs
ENVIRONMENT: list[tuple[str, str, str]] = [
    ("KINETO_LOG_LEVEL", "6",  # above its ERROR (4) and USDT (5) levels
     "torch's profiler (the memory planner of activation_checkpointing auto measures a step with it) prints "
     "profiler_start/stop lines and, on a machine without a GPU, `gpuGetDeviceCount failed`: none is a problem"),
]


def quiet_third_party() -> None:
    """Install the filters (idempotent). A value the user set in the environment is kept."""
    for variable, value, _why in ENVIRONMENT:
        os.environ.setdefault(variable, value)
    for message, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    import lightning.pytorch  # noqa: F401  (adds its handlers on import)

    for name in ("", "lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if _FILTER not in target.filters:
                target.addFilter(_FILTER)
    # The loggers Lightning's messages are created on (a logger's filter sees only its own records).
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
