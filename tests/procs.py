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


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(command: list[str], processes: int, timeout: float, env: dict[str, str], cwd: str | os.PathLike,
              logs: os.PathLike) -> subprocess.CompletedProcess:
    """Start `command` once per rank, all at once, as torchrun or srun start them (LOCAL_RANK set, so Lightning
    launches nothing). A rank that fails, or the timeout, stops the others (after SIGABRT, so that each prints
    its stacks); stderr holds every rank's log."""
    from pathlib import Path

    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "NODE_RANK": "0",
                  "PYTHONFAULTHANDLER": "1"}
    files = [logs / f"rank{rank}.log" for rank in range(processes)]
    ranks = [subprocess.Popen(command, cwd=cwd, env={**env, **rendezvous, "LOCAL_RANK": str(rank)},
                              stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
             for rank, log in enumerate(files)]
    deadline = time.monotonic() + timeout
    timed_out = False
    while any(rank.poll() is None for rank in ranks):
        failed = any(rank.poll() not in (None, 0) for rank in ranks)
        timed_out = time.monotonic() > deadline
        if failed or timed_out:
            for sig in (signal.SIGABRT, signal.SIGKILL):
                for rank in ranks:
                    if rank.poll() is None:
                        os.killpg(rank.pid, sig)
                time.sleep(5)
            break
        time.sleep(0.2)
    for rank in ranks:
        rank.wait()
    output = "\n".join(f"--- {log.name}\n{log.read_text()[-6000:]}" for log in files)
    if timed_out:
        pytest.fail(f"{' '.join(map(str, command))} did not finish in {timeout} s on {processes} ranks:\n{output}")
    returncode = next((rank.returncode for rank in ranks if rank.returncode), 0)
    return subprocess.CompletedProcess(command, returncode, stdout="", stderr=output)
