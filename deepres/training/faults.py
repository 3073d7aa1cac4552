"""When a rank dies or stops answering: which one, and where the newest complete checkpoint is.

Every rank records its host and pid in ``<run_dir>/.ranks/rank-N.json`` once the process group is up. When a
collective fails on a surviving rank (gloo's "Connection reset by peer" after a peer was killed, a timeout after
``run.collective_timeout_minutes`` when a peer hangs), ``FaultReport`` looks at the other ranks' processes
(those on the same host; the others are named with their host), says which exited or stopped, names the newest
checkpoint a resume would use, and stops the ranks this process launched, so nothing hangs on. The CLI prints
that paragraph instead of the 30-line traceback, which goes to ``<run_dir>/crash-rank-N.log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
import traceback
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

RANKS_DIR = ".ranks"
# What gloo, NCCL and torch.distributed say when a peer is gone or does not answer.
_COLLECTIVE_FAILURES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Timed out waiting",
                        "timed out", "NCCL", "ProcessGroup", "gloo", "Socket Timeout", "recvValue", "sendBytes")


def is_collective_failure(exc: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _COLLECTIVE_FAILURES)


def record_rank(run_dir: Path, rank: int) -> None:
    path = Path(run_dir) / RANKS_DIR / f"rank-{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rank": rank, "host": socket.gethostname(), "pid": os.getpid(),
                                "started": time.time()}))


def _process_state(pid: int) -> str:
    """'exited', 'stopped' (SIGSTOP, a debugger), or 'running'."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "exited"
    state = next((line.split()[1] for line in status.splitlines() if line.startswith("State:")), "R")
    return {"Z": "exited", "X": "exited", "T": "stopped", "t": "stopped"}.get(state, "running")


def peer_states(run_dir: Path, own_rank: int) -> list[str]:
    """One phrase per other rank that is not simply running: 'rank 1 (pid 42 on node1) has exited'."""
    host = socket.gethostname()
    phrases = []
    for record in sorted((Path(run_dir) / RANKS_DIR).glob("rank-*.json")):
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(record.read_text())
            if info["rank"] == own_rank:
                continue
            who = f"rank {info['rank']} (pid {info['pid']} on {info['host']})"
            if info["host"] != host:
                phrases.append(f"{who} runs on another host: check its log")
                continue
            state = _process_state(int(info["pid"]))
            if state == "exited":
                phrases.append(f"{who} has exited (killed or crashed)")
            elif state == "stopped":
                phrases.append(f"{who} is stopped (SIGSTOP or a debugger) and does not answer")
    return phrases


class FaultReport(Callback):
    """Records this rank for the others; on a failed collective, writes the report (see the module)."""

    def __init__(self, run_dir: Path, newest_checkpoint=None) -> None:
        self.run_dir = Path(run_dir)
        # () -> (path | None, step): the checkpoint a resume would pick (deepres.training.checkpoints)
        self.newest_checkpoint = newest_checkpoint
        self.report: str | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1:
            record_rank(self.run_dir, trainer.global_rank)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.world_size == 1 or not is_collective_failure(exception):
            return
        rank = trainer.global_rank
        peers = peer_states(self.run_dir, rank)
        # A killed peer's sockets close while the kernel is still taking the process down, so the collective can
        # fail a moment before /proc shows it as exited: look again for up to two seconds before blaming the network.
        deadline = time.monotonic() + 2.0
        while not peers and time.monotonic() < deadline:
            time.sleep(0.1)
            peers = peer_states(self.run_dir, rank)
        cause = "; ".join(peers) if peers else "no other rank on this host has exited or stopped (a network fault?)"
        # A background write in flight holds a checkpoint whose every part was gathered before the collective
        # failed (a rank killed inside a save dies at the save's closing barrier): finish it, so that the resume
        # starts there and the report names it.
        wait = getattr(trainer.strategy.checkpoint_io, "wait", None)
        if wait is not None:
            with contextlib.suppress(Exception):
                wait()
        where = "no complete checkpoint yet"
        if self.newest_checkpoint is not None:
            with contextlib.suppress(Exception):
                path, step = self.newest_checkpoint()
                if path is not None:
                    where = f"the newest complete checkpoint is {path} (step {step})"
        log = self.run_dir / f"crash-rank-{rank}.log"
        with contextlib.suppress(OSError):
            log.write_text("".join(traceback.format_exception(exception)))
        first = str(exception).strip().splitlines()[-1][:200] if str(exception).strip() else type(exception).__name__
        self.report = (f"deepres: rank {rank}: a collective operation failed at step {trainer.global_step}: {cause}. "
                       f"{where[0].upper() + where[1:]}; resume with the same command plus --ckpt_path last. "
                       f"(the error: {first}; full traceback: {log})")
        exception.deepres_report = self.report  # type: ignore[attr-defined]
        # Ranks this process started (Lightning's local launcher) would otherwise wait on: stop them.
        launcher = trainer.strategy.launcher
        if launcher is not None and hasattr(launcher, "kill"):
            with contextlib.suppress(Exception):
                launcher.kill(signal.SIGKILL)
