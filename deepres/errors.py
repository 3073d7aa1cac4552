"""Errors deepres raises for bad user input.

A `ConfigError` carries one paragraph that names the problem and the fix; the CLIs print it
without a traceback and exit with status 2.
"""


class ConfigError(ValueError):
    """A user-supplied setting (model name, depth, path, config key, SLURM request) is wrong."""
