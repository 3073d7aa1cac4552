"""A resume continues the run its checkpoint was written by: a setting that would change the result is refused.

Every deepres checkpoint carries the settings that decide what the run computes (`result_settings`: the model
and its block options, the data module, the per-process and global batch, the optimizer, the schedule, the
precision, gradient clipping and accumulation), written by `ResumeSettings` when the checkpoint is saved, so
that a checkpoint copied elsewhere still says how it was made. A checkpoint written before they were stored is
compared against its run directory's plan.json and its model's saved hyper-parameters.

On `--ckpt_path`, `check_resume` compares them with the settings of the new command line before any directory,
file or wandb run is made, and refuses any difference in one line naming each setting, its old and new values
and the fix. What cannot change the result is not compared: logging, the progress bar, wandb, checkpoint
intervals, max_epochs / max_steps (extending a run), the number of loader workers. A different number of
processes with the same global batch resumes: the data modules give the ranks disjoint slices of one per-epoch
order, so the samples of each step stay the same (`deepres.data.base`). `--run.resume_allow_changes` names the
settings a user changes on purpose (a lower learning rate for the rest of a run, say).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

from deepres.errors import ConfigError
from deepres.training.checkpoints import load_checkpoint, zero_model_states

SETTINGS_KEY = "deepres_result_settings"  # the checkpoint's record of its result settings
ALLOW_OPTION = "--run.resume_allow_changes"
GLOBAL_BATCH = "global_batch"
# compared only through the global batch when the number of processes changes
_PER_PROCESS = ("data.batch_size", "trainer.accumulate_grad_batches")


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples as lists, namespaces as dicts), so that a stored value and a parsed one compare
    equal when they mean the same."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    return json.loads(json.dumps(value, default=str))


def result_settings(plan: dict[str, Any], model_hparams: dict[str, Any] | None) -> dict[str, Any]:
    """The settings that decide what a run computes, flat, keyed by their command-line names.

    `plan`: a RunPlan as a dict (`RunPlan.to_dict()` or a run's plan.json); `model_hparams`: the model's optimizer
    and schedule groups (`optim`, `schedule`), from the parsed configuration or a checkpoint's hyper-parameters."""
    model, data, trainer = plan.get("model") or {}, plan.get("data") or {}, plan.get("trainer") or {}
    settings: dict[str, Any] = {"model": model.get("module"), "model.arch": model.get("arch")}
    settings.update({f"model.{k}": v for k, v in (model.get("options") or {}).items()})
    settings.update({"data": data.get("module"), "data.batch_size": data.get("batch_size"),
                     "data.train_size": data.get("train_size"),
                     "trainer.precision": trainer.get("precision"),
                     "trainer.gradient_clip_val": trainer.get("gradient_clip_val"),
                     "trainer.accumulate_grad_batches": trainer.get("accumulate_grad_batches") or 1,
                     "processes": int(trainer.get("processes") or 1) * int(trainer.get("nodes") or 1)})
    for group in ("optim", "schedule"):
        values = (model_hparams or {}).get(group)
        if isinstance(values, dict):
            settings.update({f"model.{group}.{k}": v for k, v in values.items()})
    return _plain(settings)


def live_settings(plan: Any, config: Any) -> dict[str, Any]:
    """`result_settings` of the run about to start: its RunPlan and its parsed configuration."""
    model = config.get("model") if hasattr(config, "get") else None
    init_args = (model.get("init_args") if hasattr(model, "get") else None) or {}
    get = init_args.get if hasattr(init_args, "get") else lambda k, d=None: d
    return result_settings(plan.to_dict(), {group: _plain(get(group)) for group in ("optim", "schedule")})


def stored_settings(path: str | Path, *, trusted: bool = False) -> dict[str, Any] | None:
    """The result settings a checkpoint was written with: its own record, else its run directory's plan.json
    with its model's hyper-parameters (a checkpoint from before the record); None if neither is there."""
    path = Path(path)
    file = zero_model_states(path) if path.is_dir() else path
    checkpoint = load_checkpoint(file, trusted=trusted, mmap=not path.is_dir())
    if isinstance(checkpoint.get(SETTINGS_KEY), dict):
        return checkpoint[SETTINGS_KEY]
    for run_dir in (path.parent.parent, path.parent):  # checkpoints/last.ckpt, or hpc_ckpt_N.ckpt beside plan.json
        plan = run_dir / "plan.json"
        if plan.is_file():
            try:
                return result_settings(json.loads(plan.read_text()), checkpoint.get("hyper_parameters"))
            except (OSError, ValueError):
                return None
    return None


def _differences(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{setting: (old, new)} for each compared setting that differs; a setting only one side records is left out
    (an older record, a model class with other options)."""
    changed = {k: (old[k], new[k]) for k in old.keys() & new.keys() if old[k] != new[k] and k != "processes"}
    old_p, new_p = old.get("processes", 1), new.get("processes", 1)
    if old_p != new_p:
        for key in _PER_PROCESS:
            changed.pop(key, None)

        def global_batch(s: dict[str, Any]) -> int | None:
            batch = s.get("data.batch_size")
            return None if batch is None else s.get("processes", 1) * batch * s.get("trainer.accumulate_grad_batches", 1)

        old_g, new_g = global_batch(old), global_batch(new)
        if old_g != new_g and None not in (old_g, new_g):
            changed[GLOBAL_BATCH] = (
                f"{old_g} ({old_p} × {old.get('data.batch_size')} × {old.get('trainer.accumulate_grad_batches', 1)})",
                f"{new_g} ({new_p} × {new.get('data.batch_size')} × {new.get('trainer.accumulate_grad_batches', 1)})")
    return dict(sorted(changed.items()))


def _allowed(changed: dict[str, Any], known: set[str], allow: str | None) -> tuple[set[str], list[str]]:
    """(the changed settings `allow` names, the names in it that are no setting). A name is a setting as the
    refusal prints it (model.optim.lr), its last part (lr, batch_size), or `all`. A name of a setting that did
    not change is fine: a requeued job resumes again with the same command line."""
    names = [n.strip() for n in (allow or "").split(",") if n.strip()]
    if "all" in names:
        return set(changed), []
    allowed = {k for k in changed for n in names if k == n or k.endswith("." + n)}
    unknown = [n for n in names if not any(k == n or k.endswith("." + n) for k in known)]
    return allowed, unknown


def check_resume(ckpt: str | Path, new: dict[str, Any], *, allow: str | None = None, trusted: bool = False) -> list[str]:
    """Refuse (ConfigError, one line) a resume whose settings would change the result, unless `allow` names each
    change. Returns the allowed changes as `setting old → new`, for the log."""
    old = stored_settings(ckpt, trusted=trusted)
    if old is None:
        return []
    changed = _differences(old, new)
    allowed, unknown = _allowed(changed, {*old, *new, GLOBAL_BATCH}, allow)
    refused = {k: v for k, v in changed.items() if k not in allowed}
    shown = {k: f"{k} {v[0]!r} → {v[1]!r}" if k != GLOBAL_BATCH else f"{k} {v[0]} → {v[1]} (processes × "
             f"batch_size × accumulate_grad_batches)" for k, v in changed.items()}
    if refused:
        raise ConfigError(
            f"--ckpt_path {ckpt}: this run's settings differ from the checkpoint's, and resuming would change "
            f"the result: {'; '.join(shown[k] for k in refused)}. Set them back to resume this run as it was, pass "
            f"{ALLOW_OPTION} {','.join(refused)} to continue with the new values, or start a new run without "
            "--ckpt_path.")
    if unknown:
        raise ConfigError(
            f"{ALLOW_OPTION} {allow}: {', '.join(unknown)} is no setting a resume compares (they are: "
            f"{', '.join(sorted({*old, *new} - {'processes'}))}, {GLOBAL_BATCH}, or all).")
    return [shown[k] for k in allowed]


class ResumeSettings(Callback):
    """Writes the run's result settings into every checkpoint it saves (see the module's docstring)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[SETTINGS_KEY] = self.settings
