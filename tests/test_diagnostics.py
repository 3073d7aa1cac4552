"""deepres.observability.diagnostics and deepres.observability.wandb_logging on tiny models and short CPU fits.

The wandb checks read the offline run's own transaction log (`run-<id>.wandb`: wandb's LevelDB-style
record log of protobuf `Record`s), not a mock.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import struct
import sys
import time
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import procs
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from deepres.errors import ConfigError
from deepres.models import create_model
from deepres.models.error_flow import error_flow_ratio
from deepres.observability.diagnostics import (
    DEPTH_FILE,
    DepthDiagnostics,
    PerfMonitor,
    block_key,
    count_training_flops,
    find_gates,
    spread,
)
from deepres.observability.plain_classifier import PlainClassifier
from deepres.observability.wandb_logging import (
    RUN_ID_FILE,
    WandbConfig,
    has_credentials,
    make_wandb_logger,
    resolve_mode,
)

REPO = Path(__file__).resolve().parents[1]


def loader(shape=(64,), n: int = 64, batch_size: int = 16) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch_size)


def fit(run_dir: Path, net: nn.Module, callbacks, steps: int, loggers=None, data=None, ckpt_path=None, **kw):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=loggers if loggers is not None else False,
        callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False, default_root_dir=run_dir,
        enable_checkpointing=ckpt_path is not None or kw.pop("checkpoint", False), log_every_n_steps=1, **kw,
    )
    trainer.fit(PlainClassifier(net, lr=0.05), data or loader(), ckpt_path=ckpt_path)
    return trainer


def depth_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / DEPTH_FILE).read_text().splitlines()]


def highway(gate: str = "highway", depth: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return create_model("highway_mlp", depth=depth, width=16, in_features=64, gate=gate)


# ----------------------------------------------------------------------------------------------
# Reading an offline wandb run back
# ----------------------------------------------------------------------------------------------
def wandb_records(path: Path):
    """Records of a `.wandb` file: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of
    chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last) holding protobufs."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb transaction log"
    pos, block, buffer = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: too short for a chunk header
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding at the end of a block
            pos += block - pos % block
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"corrupt chunk at byte {pos}"
        pos += 7 + length
        buffer = chunk if kind in (1, 2) else buffer + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buffer)
            yield record


def wandb_run(run_dir: Path, timeout: float = 60.0) -> dict:
    """{'id', 'config', 'history'} of the newest offline run under run_dir/wandb/.

    wandb's writer is its own process (wandb-core) and may still be flushing when the training process
    has returned, so wait for the run's `exit` record."""
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline wandb run under {run_dir}"
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(files[-1]))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    run: dict = {"history": [], "config": {}}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            run["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                *parents, leaf = [item.key] if item.key else list(item.nested_key)  # images: (key, field)
                node = row
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[leaf] = json.loads(item.value_json)
            run["history"].append(row)
    return run


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def test_block_keys_and_spread():
    assert block_key(17, 100) == "block_017"
    assert block_key(17, 3001) == "block_0017"
    assert spread(1000, 16)[0] == 0 and spread(1000, 16)[-1] == 999 and len(spread(1000, 16)) == 16
    assert spread(5, 16) == [0, 1, 2, 3, 4]
    assert spread(5, -1) == [0, 1, 2, 3, 4]
    assert spread(5, 0) == []


def test_gates_found_by_role():
    roles = sorted(role for role, _ in find_gates(highway("gated").blocks))
    assert roles == ["carry"] * 7 + ["transform"] * 7
    assert [r for r, _ in find_gates(highway("highway").blocks)] == ["transform"] * 7
    assert find_gates(highway("residual").blocks) == []
    lstm = create_model("depth_lstm", depth=3, width=8, in_features=64)
    assert sorted(r for r, _ in find_gates(lstm.blocks)) == ["carry"] * 3 + ["transform"] * 3


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="every_n_steps"):
        DepthDiagnostics(every_n_steps=0)
    with pytest.raises(ConfigError, match="peak_flops_per_device"):
        PerfMonitor(peak_flops_per_device=-1.0)


# ----------------------------------------------------------------------------------------------
# The numbers are right
# ----------------------------------------------------------------------------------------------
def test_pinned_gates_report_exactly_the_pinned_openness(tmp_path):
    net = highway("gated")
    for block in net.blocks:
        block.transform_gate.pin(0.25)
        block.carry_gate.pin(0.75)
    diag = DepthDiagnostics(every_n_steps=1)
    fit(tmp_path, net, [diag], steps=2)
    records = depth_records(tmp_path)
    assert [r["step"] for r in records] == [0, 1]
    for r in records:
        assert r["gate/transform"] == [0.25] * 7
        assert r["gate/carry"] == [0.75] * 7


class DirectComputation(pl.Callback):
    """Computes, independently of DepthDiagnostics, what it should have measured on each step."""

    def __init__(self, diag: DepthDiagnostics):
        self.diag = diag
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        net = copy.deepcopy(pl_module.net)  # the same weights, before this step's update
        self.ratio = error_flow_ratio(net, x, y)
        with torch.no_grad():
            h, rms = net.stem(x.flatten(1)), []
            for block in net.blocks:
                h = block(h)
                rms.append(float(h.pow(2).mean().sqrt()))
        self.rms = np.array(rms)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        norms = [torch.sqrt(sum(p.grad.pow(2).sum() for p in block.parameters())) for block in pl_module.net.blocks]
        np.testing.assert_allclose(self.diag.latest["grad_norm"], torch.stack(norms).numpy(), rtol=1e-5)
        np.testing.assert_allclose(self.diag.latest["act_rms"], self.rms, rtol=1e-5)
        assert self.diag.latest_error_flow_ratio == pytest.approx(self.ratio, rel=1e-5)
        self.checked += 1


def test_grad_norms_activations_and_error_flow_match_a_direct_computation(tmp_path):
    diag = DepthDiagnostics(every_n_steps=1)
    check = DirectComputation(diag)
    fit(tmp_path, highway(), [diag, check], steps=3)  # callbacks run in list order: diag first
    assert check.checked == 3


def test_lstm_gates_are_the_input_and_forget_gates(tmp_path):
    torch.manual_seed(0)
    net = create_model("depth_lstm", depth=4, width=8, in_features=64, forget_bias=1.0)
    with torch.no_grad():  # zero weights: every gate is σ(its bias) exactly
        for step in net.blocks:
            step.cell.input_proj.weight.zero_()
            step.cell.recurrent_proj.weight.zero_()
            step.cell.input_proj.bias[:24].zero_()  # i, z, o
            step.cell.input_proj.bias[24:].fill_(1.0)  # f
    fit(tmp_path, net, [DepthDiagnostics(every_n_steps=1)], steps=1)
    first = depth_records(tmp_path)[0]
    np.testing.assert_allclose(first["gate/transform"], [0.5] * 4)
    np.testing.assert_allclose(first["gate/carry"], [1 / (1 + math.exp(-1.0))] * 4, rtol=1e-4)
    assert first["error_flow_ratio"] == 0.0  # h₀ reaches the loss only through the zeroed recurrent weights


def test_lstm_over_time_reports_error_flow_from_the_raw_input(tmp_path):
    torch.manual_seed(0)
    net = create_model("lstm", input_size=2, hidden_size=8, output_size=10, num_layers=2)
    fit(tmp_path, net, [DepthDiagnostics(every_n_steps=1)], steps=1, data=loader(shape=(12, 2)))
    first = depth_records(tmp_path)[0]
    assert 0 < first["error_flow_ratio"] < math.inf
    assert len(first["gate/transform"]) == 2 and all(0 < v < 1 for v in first["gate/carry"])


def test_only_sampled_steps_are_measured_and_hooks_do_not_stay(tmp_path):
    net = highway()
    fit(tmp_path, net, [DepthDiagnostics(every_n_steps=3)], steps=7)
    assert [r["step"] for r in depth_records(tmp_path)] == [0, 3, 6]
    modules = [net.blocks, *net.blocks, *(m for _, m in find_gates(net.blocks))]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


def test_compiled_blocks_are_measured_too(tmp_path):
    """Compiled code ignores hooks added after compilation; the measured step runs eagerly instead."""
    from deepres.parallelize import parallelize

    net = highway("gated")
    for block in net.blocks:
        block.transform_gate.pin(0.25)
    parallelize(net, compile=True)
    fit(tmp_path, net, [DepthDiagnostics(every_n_steps=2)], steps=5)
    records = depth_records(tmp_path)
    assert [r["step"] for r in records] == [0, 2, 4]
    assert all(r["gate/transform"] == [0.25] * 7 and len(r["gate/carry"]) == 7 for r in records)


def test_a_plain_model_has_no_gate_arrays(tmp_path):
    fit(tmp_path, highway("residual"), [DepthDiagnostics(every_n_steps=1)], steps=1)
    assert not any(k.startswith("gate/") for k in depth_records(tmp_path)[0])


def test_training_flops_are_counted_exactly():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    batch = 5
    forward = 2 * batch * (8 * 16 + 16 * 4)
    # backward: weight gradients of both layers, input gradient of the second only (x needs none)
    backward = 2 * batch * (8 * 16 + 16 * 4) + 2 * batch * 16 * 4
    assert count_training_flops(net, torch.randn(batch, 8)) == forward + backward
    assert all(p.grad is None for p in net.parameters())


def test_perf_metrics_are_consistent(tmp_path):
    peak = 1e12
    csv = CSVLogger(tmp_path, name="", version="")
    fit(tmp_path, highway(), [PerfMonitor(every_n_steps=2, peak_flops_per_device=peak)], steps=6, loggers=[csv])
    rows = [r for r in _csv_rows(tmp_path / "metrics.csv") if r.get("perf/mfu")]
    assert [int(r["step"]) for r in rows] == [2, 4, 6][: len(rows)] and len(rows) >= 2
    for r in rows:
        per_device = float(r["perf/samples_per_s_per_device"])
        assert float(r["perf/samples_per_s"]) == pytest.approx(per_device)  # one device
        assert float(r["perf/step_time_s"]) == pytest.approx(16 / per_device, rel=1e-6)  # 16 samples a step
        flops = float(r["perf/flops_per_s_per_device"])
        assert flops == pytest.approx(float(r["perf/flops_per_sample"]) * per_device)
        assert float(r["perf/mfu"]) == pytest.approx(flops / peak)


def _csv_rows(path: Path) -> list[dict]:
    import csv

    with path.open() as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------
# wandb
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """No WANDB_MODE, no API key, no ~/.netrc: what a new user on a cluster node has."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_DISABLED"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_mode_follows_credentials(no_credentials, monkeypatch):
    assert not has_credentials()
    assert resolve_mode("auto") == "offline"
    with pytest.raises(ConfigError, match="wandb login"):
        resolve_mode("online")
    (no_credentials / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "a" * 40 + "\n")
    assert has_credentials() and resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode("auto") == "offline"
    assert resolve_mode("online") == "online"  # the YAML wins over the environment
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert make_wandb_logger(WandbConfig(), no_credentials / "run", {}) is None
    assert make_wandb_logger(WandbConfig(enabled=False, mode="offline"), no_credentials / "run", {}) is None


def test_offline_without_credentials_resumes_the_same_run(tmp_path, no_credentials, capfd):
    import wandb

    run_dir = tmp_path / "run"
    cfg = WandbConfig(project="deepres-test", tags=["test"])
    callbacks = [DepthDiagnostics(every_n_steps=2, heatmap_every_n_steps=4), PerfMonitor(every_n_steps=2)]
    from deepres.training.run_dir import run_info  # what `deepres fit` adds to the wandb run's config

    logger = make_wandb_logger(cfg, run_dir, {"model": {"name": "highway_mlp", "depth": 8}, "run_info": run_info()})
    fit(run_dir, highway(), callbacks, steps=6, loggers=[logger], checkpoint=True)
    wandb.finish()
    assert "wandb sync " + str(run_dir / "wandb" / "offline-run-") in capfd.readouterr().out

    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    first = wandb_run(run_dir)
    assert first["id"] == run_id
    keys = {k for row in first["history"] for k in row}
    assert {"depth/error_flow_ratio", "depth/grad_norm/block_000", "depth/gate/transform/block_006",
            "depth/act_rms/max", "perf/samples_per_s", "perf/step_time_s", "train/loss"} <= keys
    assert any(row.get("depth/heatmap/gates", {}).get("_type") == "image-file" for row in first["history"])
    assert first["config"]["model"] == {"name": "highway_mlp", "depth": 8}
    assert {"torch", "lightning", "wandb"} <= first["config"]["run_info"]["versions"].keys()
    assert "git_sha" in first["config"]["run_info"]

    ckpt = next(run_dir.rglob("*.ckpt"))
    callbacks = [DepthDiagnostics(every_n_steps=2), PerfMonitor(every_n_steps=2)]
    from deepres.training.run_dir import run_info  # what `deepres fit` adds to the wandb run's config

    logger = make_wandb_logger(cfg, run_dir, {"model": {"name": "highway_mlp", "depth": 8}, "run_info": run_info()})
    fit(run_dir, highway(), callbacks, steps=10, loggers=[logger], ckpt_path=ckpt)
    wandb.finish()
    sessions = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(sessions) == 2 and all(s.name.endswith("-" + run_id) for s in sessions)
    assert wandb_run(run_dir)["id"] == run_id
    assert [r["step"] for r in depth_records(run_dir)] == [0, 2, 4, 6, 8]


def deepres_fit(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 900):
    """Run `deepres fit ARGS` in a fresh process, with the `diagnostics:` and `wandb:` sections the CLI has."""
    command = [sys.executable, "-m", "deepres", "fit", *args]
    env = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1", **(env or {})}
    return procs.run(command, timeout, env=env, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_process_ddp_fit_writes_one_offline_run(tmp_path):
    done = deepres_fit(
        tmp_path, "--run.root", str(tmp_path / "runs"), "--run.name", "ddp", "--model.depth", "6",
        "--trainer.max_steps", "4", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp", "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
        "--diagnostics.every_n_steps", "2", "--wandb.mode", "offline",
        env={"WANDB_MODE": "offline"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in done.stderr + done.stdout  # really two processes
    run_dir = tmp_path / "runs" / "ddp"
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert done.stdout.count("Upload it with") == 1  # the sync hint comes from rank 0 only
    run = wandb_run(run_dir)
    assert run["id"] == (run_dir / RUN_ID_FILE).read_text().strip()
    assert run["config"]["diagnostics"]["every_n_steps"] == 2  # the resolved deepres config
    keys = {k for row in run["history"] for k in row}
    assert {"depth/error_flow_ratio", "depth/grad_norm/block_000", "depth/gate/transform/block_004",
            "perf/samples_per_s", "perf/samples_per_s_per_device", "train/loss"} <= keys
    rows = [row for row in run["history"] if "perf/samples_per_s" in row]
    assert rows and all(r["perf/samples_per_s"] == pytest.approx(2 * r["perf/samples_per_s_per_device"])
                        for r in rows)
    assert [r["step"] for r in depth_records(run_dir)] == [0, 2]  # rank 0 alone wrote the depth file


def test_wandb_failing_to_start_does_not_stop_training(tmp_path, monkeypatch):
    """A dashboard must never end a training job: if wandb.init raises, logging goes on without it."""
    import wandb

    from deepres.observability.wandb_logging import DeepresWandbLogger

    def refuse(**_kwargs):
        raise RuntimeError("run ID abc is in use")

    monkeypatch.setattr(wandb, "init", refuse)
    logger = DeepresWandbLogger(project="p", id="abc", mode="offline", save_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="Training goes on without wandb"):
        experiment = logger.experiment
    assert type(experiment).__name__ == "_DummyExperiment"
    logger.log_hyperparams({"lr": 0.1})
    logger.log_metrics({"train/loss": 1.0}, step=1)
    logger.finalize("success")


def test_finishing_before_a_requeue_keeps_every_step_once_and_leaves_no_service_to_kill(tmp_path, monkeypatch):
    """Before a SLURM requeue (whose SIGTERM reaches wandb's service too) the attempt finishes its session and
    stops the service; the next attempt continues the same run. Every logged step is then on disk once."""
    def services() -> list[str]:  # this process's wandb-core children
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                name, rest = stat.read_text().rsplit(")", 1)
                if rest.split()[1] == str(os.getpid()) and name.endswith("(wandb-core"):
                    found.append(stat.parent.name)
        return found

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_SERVICE", raising=False)

    def attempt(steps: range, requeued: bool) -> None:
        logger = make_wandb_logger(WandbConfig(), tmp_path, {"attempt": steps.start})
        for step in steps:
            logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
        if requeued:
            assert services()
            logger.finish_before_requeue()
            assert not services()
            logger.log_metrics({"train/loss": 0.0}, step=99)  # after the session ended: dropped, not an error
        logger.finalize("success")

    attempt(range(0, 3), requeued=True)
    # wandb names an offline session's folder by the second it started in; a requeued attempt starts many seconds
    # later, these two could start within one second and share a folder
    time.sleep(1.1)
    attempt(range(3, 5), requeued=False)
    run_id = (tmp_path / RUN_ID_FILE).read_text().strip()
    sessions = sorted(tmp_path.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(sessions) == 2
    steps = [json.loads(item.value_json) for session in sessions for record in wandb_records(session)
             if record.WhichOneof("record_type") == "history"
             for item in record.history.item if (item.key or "/".join(item.nested_key)) == "trainer/global_step"]
    assert steps == [0, 1, 2, 3, 4]
