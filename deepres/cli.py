"""The `deepres` command.

    deepres fit|validate|test [LightningCLI arguments]   train / evaluate (deepres.training.cli)
    deepres configs                                       list the configs `--config NAME` accepts
    deepres shard SRC OUT | --index SHARDS | --verify OUT write, index or verify webdataset shards
    deepres submit --config FILE [...]                    submit to SLURM (deepres.slurm); --sweep: a job array
    deepres sweep-summary RUNS/NAME                       a sweep's points and final metrics (deepres.observability.sweep_summary)
    deepres report RUN_DIR [--out DIR]                    PNG figures from a run directory (deepres.observability.report)
    deepres convert-zero CKPT_DIR OUT                     DeepSpeed ZeRO checkpoint -> plain state dict

Each sub-command lives in its own module and is imported only when used, so `deepres shard`
does not pay for importing Lightning.
"""

from __future__ import annotations

import importlib
import sys

# sub-command -> (module, function taking argv)
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("deepres.training.cli", "main"),
    "validate": ("deepres.training.cli", "main"),
    "test": ("deepres.training.cli", "main"),
    "configs": ("deepres.config_names", "main"),
    "shard": ("deepres.data.shard_writer", "main"),
    "submit": ("deepres.slurm.submit", "main"),
    "sweep-summary": ("deepres.observability.sweep_summary", "main"),
    "report": ("deepres.observability.report", "main"),
    "convert-zero": ("deepres.training.convert_zero", "convert_zero_main"),
}


def _usage() -> str:
    return __doc__.split("\n\n")[1] if __doc__ else ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        if not argv:
            # `deepres` alone is `deepres fit` on the built-in default job.
            argv = ["fit"]
        else:
            print("usage:\n" + _usage())
            return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        if cmd.startswith("-"):
            argv = ["fit", *argv]
            cmd = "fit"
        else:
            print(
                f"deepres: unknown command {cmd!r}. Valid commands: {', '.join(COMMANDS)}.\n"
                "Run `deepres --help` for a summary.",
                file=sys.stderr,
            )
            return 2
    if cmd == "fit":
        # Before the slow torch/Lightning imports: a SLURM requeue signal that arrives now must
        # requeue the job, not end it as COMPLETED with no work done (deepres.slurm.requeue).
        from deepres.slurm.job import prepare_process

        prepare_process(cmd)
    if cmd in ("fit", "validate", "test", "submit"):
        from deepres.config_names import resolve_config_args
        from deepres.errors import ConfigError

        try:  # `--config resnet110_cifar10`: the config of that name that ships with deepres
            argv = resolve_config_args(argv)
        except ConfigError as exc:
            print(f"deepres: error: {exc}", file=sys.stderr)
            return 2
    module, func = COMMANDS[cmd]
    entry = getattr(importlib.import_module(module), func)
    # fit/validate/test keep the sub-command (LightningCLI parses it); the others drop it.
    rc = entry(argv if cmd in ("fit", "validate", "test") else argv[1:])
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
