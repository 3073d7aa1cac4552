"""Every Lightning internal deepres relies on (deepres.lightning_compat) still exists and behaves as deepres
expects. A failure names the internal and the Lightning version: raise Lightning's pin only once this passes."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from deepres import lightning_compat as compat

PACKAGE = Path(compat.__file__).parent
MOVED = f"Lightning {compat.VERSION} (deepres was tested with {compat.TESTED_WITH}.x)"


def test_the_installed_lightning_is_the_minor_version_the_pin_names():
    assert compat.VERSION.startswith(compat.TESTED_WITH + "."), MOVED


@pytest.mark.parametrize(("path", "attribute", "params", "why"), compat.OVERRIDES,
                         ids=[f"{c.rsplit('.', 1)[1]}.{a}" for c, a, _, _ in compat.OVERRIDES])
def test_each_overridden_internal_is_still_there(path, attribute, params, why):
    module, name = path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    if params is None:  # an instance attribute set in __init__: look for the assignment in Lightning's source
        source = "".join(inspect.getsource(c) for c in cls.__mro__ if c.__module__.startswith("lightning"))
        assert f"self.{attribute} =" in source or f"self.{attribute}:" in source, \
            f"{path}.{attribute} ({why}) is gone in {MOVED}"
        return
    assert hasattr(cls, attribute), f"{path}.{attribute} ({why}) is gone in {MOVED}"
    found = tuple(inspect.signature(getattr(cls, attribute)).parameters)
    assert found == params, f"{path}.{attribute} ({why}) now takes {found}, not {params}, in {MOVED}"


def test_the_helpers_work_on_this_lightning():
    assert compat.unified_precision("bf16") == "bf16-mixed" and compat.unified_precision(16) == "16-mixed", MOVED
    assert compat.auto_accelerator() == ("cuda" if torch.cuda.is_available() else "cpu"), MOVED
    assert isinstance(compat.deepspeed_available(), bool)
    assert compat.is_deepspeed_checkpoint(PACKAGE) is False


class _Probe(LightningModule):
    """Records what the trainer-reading helpers say during a real fit."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.logs: list[bool] = []
        self.done: list[int] = []

    def training_step(self, batch, batch_idx):
        self.logs.append(compat.should_update_logs(self.trainer))
        self.done.append(compat.batches_done_in_epoch(self.trainer))
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_the_trainer_readers_follow_a_real_fit(tmp_path):
    probe = _Probe()
    data = DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=2)
    trainer = Trainer(max_steps=6, log_every_n_steps=3, default_root_dir=tmp_path, logger=True,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      accelerator="cpu", devices=1)
    trainer.fit(probe, data)
    # Lightning writes step logs on steps 3 and 6 (global_step 2 and 5 at training_step time) and the last one.
    assert probe.logs == [False, False, True, False, False, True], f"should_update_logs moved in {MOVED}"
    assert probe.done == [0] * 6, f"batches_done_in_epoch outside a restart in {MOVED}"


class _ValidatingProbe(_Probe):
    """Records, after every training batch, whether Lightning validates after it on its own schedule."""

    def __init__(self):
        super().__init__()
        self.validates: list[bool] = []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.validates.append(compat.validates_after_this_batch(self.trainer))
        # a stop request (Lightning then validates at once) is not a scheduled validation
        self.trainer.should_stop = self.current_epoch == 1 and batch_idx == 3

    def validation_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()


class _LastBatchProbe(_Probe):
    """Records, after every training batch, whether it was the last of its epoch; stops inside epoch 1."""

    def __init__(self):
        super().__init__()
        self.last: list[bool] = []
        self.epoch_ends: list[bool] = []

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.last.append(compat.at_the_epochs_last_batch(self.trainer))
        self.trainer.should_stop = self.current_epoch == 1 and batch_idx == 2

    def on_train_epoch_end(self):
        self.epoch_ends.append(compat.at_the_epochs_last_batch(self.trainer))


def test_at_the_epochs_last_batch_follows_a_real_fit_and_a_stop(tmp_path):
    probe = _LastBatchProbe()
    data = DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=2)
    trainer = Trainer(max_epochs=2, default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      accelerator="cpu", devices=1)
    trainer.fit(probe, data)
    # 4 batches per epoch; epoch 1 is stopped after its batch 2, and its epoch end then comes early
    assert probe.last == [False, False, False, True, False, False, False], f"at_the_epochs_last_batch in {MOVED}"
    assert probe.epoch_ends == [True, False], f"at_the_epochs_last_batch in {MOVED}"


def test_validates_after_this_batch_follows_lightnings_schedule(tmp_path):
    probe = _ValidatingProbe()
    data = DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=2)
    trainer = Trainer(max_epochs=2, default_root_dir=tmp_path, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      num_sanity_val_steps=0, accelerator="cpu", devices=1, val_check_interval=3)
    trainer.fit(probe, data, data)
    # 6 batches per epoch, validation after every third (batch indices 2 and 5); stopped after batch 3 of epoch 1
    assert probe.validates == [False, False, True, False, False, True, False, False, True, False], \
        f"validates_after_this_batch in {MOVED}"


def _written_rows(path: Path) -> list[tuple[int, dict]]:
    """A CSVLogger's rows as (step, {key: value}), the values typed as the loggers were given them."""
    import csv

    with open(path, newline="") as f:
        return [(int(r["step"]), {k: (int(v) if k == "epoch" else float(v)) for k, v in r.items() if v and k != "step"})
                for r in csv.DictReader(f)]


class _RowProbe(_Probe):
    """Logs per step and per epoch; records, after every training batch and every epoch, the row Lightning is
    about to write."""

    def __init__(self):
        super().__init__()
        self.due: list[tuple[int, dict]] = []

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        self.log("train/epoch_mean", loss, on_step=False, on_epoch=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        row = compat.step_row_due(self.trainer)
        if row is not None:
            self.due.append(row)

    def on_train_epoch_end(self):
        self.due.append(compat.epoch_row_due(self.trainer))


def test_the_rows_due_are_the_rows_lightning_then_writes(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    probe = _RowProbe()
    data = DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=2)  # 6 steps an epoch
    trainer = Trainer(max_epochs=2, log_every_n_steps=2, default_root_dir=tmp_path, logger=CSVLogger(tmp_path, "r", ""),
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      accelerator="cpu", devices=1)
    trainer.fit(probe, data)
    # step rows after steps 2, 4, 6, ... (step 1, 3, 5, ...), an epoch row at each epoch's last step
    assert [(step, "train/loss" in row) for step, row in probe.due] == \
        [(1, True), (3, True), (5, True), (5, False), (7, True), (9, True), (11, True), (11, False)], \
        f"step_row_due's or epoch_row_due's schedule in {MOVED}"
    assert probe.due == _written_rows(tmp_path / "r" / "metrics.csv"), f"the rows' values in {MOVED}"


def test_no_module_outside_lightning_compat_imports_a_private_lightning_name():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "lightning_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning"):
                offenders += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.module}.{a.name}"
                              for a in node.names if a.name.startswith("_")]
    assert not offenders, "private Lightning names belong in deepres/lightning_compat.py:\n" + "\n".join(offenders)


def test_the_launcher_still_calls_the_observer_deepres_replaces():
    launcher = importlib.import_module("lightning.pytorch.strategies.launchers.subprocess_script")
    assert callable(getattr(launcher, "_launch_process_observer", None)), f"_launch_process_observer is gone in {MOVED}"
    assert "_launch_process_observer(self.procs)" in inspect.getsource(launcher._SubprocessScriptLauncher.launch), \
        f"the subprocess launcher no longer starts its observer through _launch_process_observer in {MOVED}"


def test_the_patient_observer_waits_for_rank_0_then_stops_every_rank(tmp_path):
    """A dead rank leaves rank 0 the grace period; after it, the others and rank 0 itself are killed with a line."""
    import subprocess
    import sys
    import time

    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    hanging = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    main = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # stands in for rank 0
    observer = compat.PatientProcessObserver([dead, hanging], main_pid=main.pid, grace_s=1.5, poll_s=0.1)
    started = time.monotonic()
    observer.start()
    time.sleep(1.0)
    assert hanging.poll() is None and main.poll() is None  # still inside the grace period
    observer.join(timeout=10)
    assert main.wait(timeout=10) == -9 and hanging.wait(timeout=10) == -9
    assert 1.5 <= time.monotonic() - started < 10
