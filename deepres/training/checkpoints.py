"""Checkpoint files: written so that a crash costs at most one interval, read so that they never run code.

On disk, in ``<run_dir>/checkpoints/``::

    last.ckpt       the newest complete checkpoint
    previous.ckpt   the one before it, kept so that a damaged last.ckpt still leaves one to resume from

Writing (``CheckpointFiles``, the Trainer's checkpoint I/O): the checkpoint goes to a temporary file in the same
directory, is fsynced, and only then renamed over ``last.ckpt`` (the old one becoming ``previous.ckpt``). A kill,
a full disk or a power cut at any point leaves the previous complete files in place, and a failed write leaves
no partial file. ``deepres.training.run_checkpoint.RunCheckpoint`` decides *when* to save.

Reading (``load_checkpoint``): ``torch.load(weights_only=True)``, so unpickling can only build tensors, plain
containers and the classes in ``SAFE_GLOBALS``. A checkpoint is a pickle, and a pickle can call any function;
checkpoints travel between people and sit on shared file systems. A file that needs anything else is refused
with one line naming what it asked for and the option that accepts a trusted file.

Resuming (``find_resume_checkpoint``): the newest checkpoint of a run that is complete (a zip archive whose
records pass their CRC check, or a ZeRO directory with its ``latest`` index) and that loads; every one skipped is
reported with the reason.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from deepres.errors import ConfigError
from deepres.files import atomic_open, fsync_dir
from deepres.lightning_compat import PathLike

LAST = "last.ckpt"
PREVIOUS = "previous.ckpt"
# The option that loads a checkpoint deepres would refuse, for a file the user trusts.
TRUST_OPTION = "--weights_only false"

# Classes beyond tensors and builtin containers that deepres checkpoints contain (hyper-parameter dataclasses,
# say). Registered with torch, so Lightning's own loading (weights_only=True) accepts them too.
SAFE_GLOBALS: list[Any] = []


def allow_in_checkpoints(*objects: Any) -> None:
    """Let checkpoints contain these classes (or functions); call where they are defined."""
    SAFE_GLOBALS.extend(objects)
    torch.serialization.add_safe_globals(list(objects))


class UnsafeCheckpointError(ConfigError):
    """A checkpoint whose unpickling would call something no deepres checkpoint needs."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; the previous complete checkpoint is untouched. `stopped_at`: the step at
    which training stopped because of it (set where a background write's failure is noticed)."""

    def __init__(self, message: str, stopped_at: int | None = None) -> None:
        super().__init__(message)
        self.message, self.stopped_at = message, stopped_at

    def __str__(self) -> str:
        stopped = f" Training stopped at step {self.stopped_at}." if self.stopped_at is not None else ""
        return f"{self.message}{stopped} Free space and resume with --ckpt_path last."


def _write_failure(path: Path, step: Any, err: OSError) -> str:
    """What failed, why, and which complete checkpoint a resume will use."""
    kept = path if path.exists() else path.with_name(PREVIOUS)
    if kept.exists():
        try:
            untouched = f"{kept} (step {checkpoint_global_step(kept)}) is untouched"
        except Exception:
            untouched = f"{kept} is untouched"
    else:
        untouched = "there is no earlier checkpoint to resume from"
    at = f" at step {step}" if step is not None else ""
    return (f"could not write checkpoint {path}{at}: {err.strerror or err} (disk full, quota or file size limit?); "
            f"nothing partial was left, and {untouched}.")


# ------------------------------------------------------------------------------------------------- reading
def load_checkpoint(path: str | Path, *, trusted: bool = False, map_location: Any = "cpu", mmap: bool = False,
                    option: str = TRUST_OPTION, allow: list[Any] | tuple[Any, ...] = ()) -> Any:
    """``torch.load`` that only builds tensors, containers, ``SAFE_GLOBALS`` and ``allow`` unless ``trusted``.

    ``mmap=True`` maps tensor data instead of reading it (for looking at the step of a large checkpoint).
    Raises ``UnsafeCheckpointError`` (one line, naming the global it asked for and ``option``)."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=not trusted, mmap=mmap)
    except pickle.UnpicklingError as err:
        asked = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"`{asked[1]}`" if asked else "an object outside the allowed types"
        raise UnsafeCheckpointError(
            f"refused to load {path}: unpickling it would call {what}, which no deepres checkpoint contains "
            f"(loading it could run code). If you trust the file, pass {option}."
        ) from None


def deepspeed_checkpoint_globals() -> list[Any]:
    """The classes DeepSpeed pickles into a ZeRO checkpoint's optimizer-state files (its loss scalers, the ZeRO
    stage enum, the address of a parameter's fragment): plain records, built without running other code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def zero_model_states(path: Path) -> Path:
    """The file of a DeepSpeed ZeRO checkpoint directory that holds Lightning's client state (global_step,
    loops, ...): mp_rank_00_model_states.pt (ZeRO 1/2) or zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO 3)."""
    tag = (path / "latest").read_text().strip() if (path / "latest").is_file() else "checkpoint"
    states = sorted((path / tag).glob("*model_states.pt"))
    if not states:
        raise ConfigError(f"{path} is a directory but not a DeepSpeed checkpoint: no {tag}/*model_states.pt in it.")
    return states[0]


def checkpoint_global_step(path: str | Path, *, trusted: bool = False) -> int:
    """The optimizer step a checkpoint was saved at, for a Lightning .ckpt file or a ZeRO directory."""
    path = Path(path)
    file = zero_model_states(path) if path.is_dir() else path
    return int(load_checkpoint(file, trusted=trusted, mmap=not path.is_dir()).get("global_step", 0))


def damage(path: Path) -> str | None:
    """Why a checkpoint is not complete, or None if it is.

    ``torch.save`` writes a zip archive whose central directory comes last and a CRC-32 for every record, so a
    file cut short does not open as a zip and a flipped byte fails its record's check. DeepSpeed writes a
    directory and its ``latest`` index last."""
    if path.is_dir():
        return None if (path / "latest").is_file() else "a directory without DeepSpeed's `latest` index (cut short)"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "a zip archive without a pickled checkpoint in it"
            bad = archive.testzip()
            return f"record {bad} fails its CRC check (corrupt)" if bad else None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        return f"not a complete archive (truncated or overwritten: {err})"


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"skipped {self.path}: {self.reason}"


def _written_at(path: Path) -> float:
    if path.is_dir():
        index = path / "latest"
        return (index if index.is_file() else path).stat().st_mtime
    return path.stat().st_mtime


def checkpoint_candidates(run_dir: Path) -> list[Path]:
    """A run's checkpoints, newest first: checkpoints/*.ckpt (last, previous, a user's top-k files) and Lightning's
    hpc_ckpt_*.ckpt. Newest by write time, not by name or step: what was written last is where the run was."""
    run_dir = Path(run_dir)
    found = [*run_dir.glob("checkpoints/*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
    return sorted(found, key=_written_at, reverse=True)


def find_resume_checkpoint(run_dir: str | Path, *, trusted: bool = False) -> tuple[Path | None, int, list[Skipped]]:
    """(newest complete checkpoint that loads, its global step, what was skipped on the way and why).

    A checkpoint that would run code is not skipped but refused (UnsafeCheckpointError): falling back past it
    would hide that somebody put it there."""
    skipped: list[Skipped] = []
    for path in checkpoint_candidates(Path(run_dir)):
        reason = damage(path)
        if reason is None:
            try:
                return path, checkpoint_global_step(path, trusted=trusted), skipped
            except UnsafeCheckpointError:
                raise
            except Exception as err:  # a checkpoint that does not load is as good as none
                reason = f"does not load ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        skipped.append(Skipped(path, reason))
    return None, 0, skipped


def describe_checkpoints_dir(run_dir: Path) -> str:
    """What a run directory holds, for an error that says there is nothing to resume from."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return f"{run_dir} does not exist"
    names = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir()) if (run_dir / "checkpoints").is_dir() else []
    return (f"{run_dir} holds {', '.join(names) or 'nothing'}"
            + (f"; checkpoints/ holds {', '.join(ckpts)}" if ckpts else "; no checkpoints/"))


# ------------------------------------------------------------------------------------------------- writing
def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Temporary files a killed writer left behind (``.NAME.tmp-PID`` whose PID no longer runs)."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                if tmp.is_dir():
                    shutil.rmtree(tmp)
                else:
                    tmp.unlink()
                removed.append(tmp)
    return removed


def install_checkpoint(partial: Path, final: Path) -> None:
    """Move a complete checkpoint (file or directory) into place; a ``last.ckpt`` it replaces becomes
    ``previous.ckpt``. Both renames are atomic; between them the newest complete checkpoint is previous.ckpt."""
    if final.exists() and final.name == LAST:
        previous = final.with_name(PREVIOUS)
        if previous.is_dir():  # os.replace cannot overwrite a directory (ZeRO checkpoints are directories)
            shutil.rmtree(previous)
        os.replace(final, previous)
    elif final.is_dir():
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_dir(final.parent)


class _RecordingWriter:
    """A file's write/flush that remembers the first OSError."""

    def __init__(self, file: Any) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


class CheckpointFiles(TorchCheckpointIO):
    """Lightning's checkpoint I/O, writing to a temporary file, fsyncing, then installing it (see
    ``install_checkpoint``). Object-store paths (``s3://…``) go to Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_open(path, install=install_checkpoint) as f:
                writer = _RecordingWriter(f)
                try:
                    torch.save(checkpoint, writer)
                except RuntimeError:
                    # torch's zip writer reports a failed write as a RuntimeError ("unexpected pos"): the
                    # OSError it swallowed (no space, quota, file size limit) is the cause to name.
                    if writer.error is None:
                        raise
                    raise writer.error from None
        except OSError as err:
            raise CheckpointWriteError(_write_failure(path, checkpoint.get("global_step"), err)) from None


def load_module(cls: Any, path: str | Path, *, trusted: bool = False, map_location: Any = "cpu") -> Any:
    """``cls.load_from_checkpoint(path)`` (a LightningModule) after the same check as ``load_checkpoint``: a file
    that would run code is refused with one line before Lightning opens it."""
    load_checkpoint(path, trusted=trusted, mmap=True)
    return cls.load_from_checkpoint(path, map_location=map_location, weights_only=not trusted)


class BackgroundCheckpointFiles(CheckpointFiles):
    """CheckpointFiles that writes from a background thread.

    The training thread only stages the checkpoint: every tensor copied to CPU memory (a device-to-host copy
    for GPU tensors, so no second copy of the model and optimizer state is held on the GPU, unlike Lightning's
    AsyncCheckpointIO, which clones on the device). Serialising, writing and fsyncing run in one worker thread,
    one checkpoint after another. A failed write is raised where ``failure()`` is asked (RunCheckpoint does at
    every optimizer step, so training stops within a step or two of it), else at the next save or at teardown,
    with the same message; the previous checkpoint stays in place either way."""

    def __init__(self) -> None:
        super().__init__()
        self._executor: Any = None
        self._pending: Any = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from lightning_utilities.core.apply_func import apply_to_collection

        self.wait()  # the previous write first: its error, if any, surfaces here
        staged = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepres-checkpoint")
        self._pending = self._executor.submit(super().save_checkpoint, staged, path, storage_options)

    def failure(self) -> CheckpointWriteError | None:
        """The error of a write that has failed, without waiting for one in flight (it is then forgotten)."""
        pending = self._pending
        if pending is None or not pending.done() or pending.exception() is None:
            return None
        self._pending = None
        error = pending.exception()
        return error if isinstance(error, CheckpointWriteError) else CheckpointWriteError(str(error))

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
