"""Run a command that may start DDP ranks and data-loader workers, and never lose why it hung.

On timeout every process of the command's session gets SIGABRT first: with PYTHONFAULTHANDLER set,
each Python process (ranks, workers) prints the stack of every thread to stderr before it dies, and
the test fails with that output instead of a bare TimeoutExpired.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**(env if env is not None else os.environ), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGABRT, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(grace)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish in {timeout} s; the stacks of its processes:\n"
                    f"{err[-12000:]}\nstdout:\n{out[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
