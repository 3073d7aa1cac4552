"""deepres on SLURM: the submit checks and the rendered script, requeue and resume, and end-to-end jobs on a
real (local) SLURM cluster started by scripts/slurm_local.sh.

The end-to-end tests install and start the cluster themselves (Debian packages, root); they are skipped,
with the reason, only where that cannot be done.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deepres.errors import ConfigError
from deepres.slurm import requeue
from deepres.slurm.callback import SlurmRequeue
from deepres.slurm.submit import ClusterRequest, Plan, ProcessLayout, job_block, plan, render
from deepres.training.checkpoints import CheckpointFiles, damage, find_resume_checkpoint, load_checkpoint
from deepres.training.run_checkpoint import RunCheckpoint

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


# ============================================================================ checking the request (pure)
def test_plan_fills_devices_nodes_and_accelerator_the_config_leaves_open():
    checked = plan(ClusterRequest(nodes=2, tasks_per_node=3), ProcessLayout())
    assert (checked.nodes, checked.tasks_per_node, checked.gpus_per_node) == (2, 3, 0)
    assert checked.trainer_overrides == [
        "--trainer.devices", "3", "--trainer.num_nodes", "2", "--trainer.accelerator", "cpu",
    ]
    on_gpus = plan(ClusterRequest(gpus_per_node=4), ProcessLayout(devices=4))
    assert (on_gpus.nodes, on_gpus.tasks_per_node, on_gpus.gpus_per_node) == (1, 4, 4)
    assert on_gpus.trainer_overrides == ["--trainer.accelerator", "gpu"]


def test_plan_takes_the_counts_from_the_trainer_when_the_request_leaves_them_open():
    checked = plan(ClusterRequest(), ProcessLayout(num_nodes=2, devices=[0, 1], accelerator="cpu"))
    assert (checked.nodes, checked.tasks_per_node, checked.trainer_overrides) == (2, 2, [])


def test_plan_refuses_tasks_per_node_that_disagree_with_devices():
    with pytest.raises(ConfigError) as err:
        plan(ClusterRequest(tasks_per_node=2), ProcessLayout(devices=1, accelerator="cpu"))
    message = str(err.value)
    assert "--tasks-per-node 2" in message and "trainer.devices=1" in message
    assert "--trainer.devices 2" in message  # the fix


def test_plan_refuses_nodes_that_disagree_with_num_nodes():
    with pytest.raises(ConfigError, match=r"--nodes 2 disagrees with trainer.num_nodes=4.*--trainer.num_nodes 2"):
        plan(ClusterRequest(nodes=2), ProcessLayout(num_nodes=4))


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_notebook", {"class_path": "x.DDPSpawnStrategy"}])
def test_plan_refuses_strategies_that_spawn_their_own_processes(strategy):
    with pytest.raises(ConfigError, match="starts its own processes.*--trainer.strategy ddp"):
        plan(ClusterRequest(nodes=2), ProcessLayout(strategy=strategy))
    plan(ClusterRequest(), ProcessLayout(strategy="ddp_spawn"))  # one process: nothing to launch


def test_plan_refuses_a_time_limit_not_longer_than_the_signal_lead():
    with pytest.raises(ConfigError, match=r"--time 2:00 \(120 s\) is not longer than --signal-lead 120"):
        plan(ClusterRequest(time="2:00", signal_lead=120), ProcessLayout())
    assert plan(ClusterRequest(time="2:01", signal_lead=120), ProcessLayout()).nodes == 1
    with pytest.raises(ConfigError, match="not a SLURM time"):
        plan(ClusterRequest(time="two hours"), ProcessLayout())


def test_plan_refuses_gpus_without_a_gpu_accelerator_and_the_reverse():
    with pytest.raises(ConfigError, match="accelerator=cpu would leave the GPUs idle"):
        plan(ClusterRequest(gpus_per_node=2), ProcessLayout(accelerator="cpu"))
    with pytest.raises(ConfigError, match="no GPUs are requested.*--gpus-per-node 1"):
        plan(ClusterRequest(), ProcessLayout(accelerator="gpu"))


@pytest.mark.parametrize("request_", [ClusterRequest(nodes=0), ClusterRequest(tasks_per_node=0),
                                      ClusterRequest(gpus_per_node=-1), ClusterRequest(signal_lead=0)])
def test_plan_refuses_counts_that_are_not_positive(request_):
    with pytest.raises(ConfigError, match="give"):
        plan(request_, ProcessLayout())


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("1:30", 90), ("2:00:00", 7200), ("1-2", 93600), ("1-0:30", 88200), ("1-00:00:05", 86405),
     ("UNLIMITED", None)],
)
def test_parse_slurm_time(text, seconds):
    assert requeue.parse_slurm_time(text) == seconds


# ====================================================================================== rendering (pure)
def _render(tmp_path: Path, args: list[str], name: str = "run1", config: Path | None = None) -> str:
    request = ClusterRequest(nodes=2, tasks_per_node=1, time="10:00", partition="local", signal_lead=30)
    checked = Plan(nodes=2, tasks_per_node=1, gpus_per_node=0)
    return render(request, checked, name=name, run_dir=tmp_path / "runs" / name, workdir=tmp_path,
                  deepres=[PYTHON, "-m", "deepres"], config=config, args=args)


def test_rendered_script_has_the_request_and_is_valid_bash(tmp_path):
    script = _render(tmp_path, ["--trainer.max_steps", "5"])
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=10:00",
                 "#SBATCH --signal=USR1@30", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --output={tmp_path}/runs/run1/slurm-%j.out", "SIGNAL_LEAD=30"):
        assert line in script.splitlines()
    sbatch_lines = [line for line in script.splitlines() if line.startswith(("#SBATCH", "##SBATCH"))]
    assert not [line for line in sbatch_lines if "gpus" in line or "account" in line or "##" in line]
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_rendered_values_cannot_inject_shell_commands(tmp_path):
    marker = tmp_path / "pwned"
    evil = [f"--model.name=$(touch {marker})", f"x; touch {marker}", f"`touch {marker}`", "it's", "a\nb", "*"]
    config = tmp_path / f"cfg $(touch {marker}).yaml"
    script = _render(tmp_path, evil, config=config)
    job = script.split("# ---- job:", 1)[1].split("# ---- end job ----", 1)[0]
    # Run the job block for real and read the values back.
    out = subprocess.run(
        ["bash", "-c", job.split("\n", 1)[1] + '\nprintf "%s\\0" "$CONFIG" "${ARGS[@]}"'],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout
    assert out.split("\0")[:-1] == [str(config), *evil]
    assert not marker.exists()


@pytest.mark.parametrize("name", ["a b", "x\n#SBATCH --uid=0", "$(reboot)", "../up", "-dash"])
def test_run_names_that_are_not_plain_are_refused(name):
    from deepres.slurm.submit import _run_name

    with pytest.raises(ConfigError, match="--name"):
        _run_name(name, None)


def test_an_existing_run_directory_is_refused_unless_resuming(tmp_path):
    from deepres.slurm.submit import _check_run_dir_is_new

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already exists.*another --name.*--ckpt_path last"):
        _check_run_dir_is_new(tmp_path / "run", ["--trainer.max_steps", "5"])
    _check_run_dir_is_new(tmp_path / "run", ["--ckpt_path", "last"])
    _check_run_dir_is_new(tmp_path / "new", [])


def test_sbatch_values_with_spaces_or_newlines_are_refused(tmp_path):
    request = ClusterRequest(partition="gpu\nrm -rf /")
    with pytest.raises(ConfigError, match="--partition"):
        render(request, Plan(1, 1, 0), name="r", run_dir=tmp_path, workdir=tmp_path, deepres=["deepres"],
               config=None, args=[])


def test_job_block_quotes_every_value():
    assert job_block(["/a b/python", "-m", "deepres"], None, ["--x", "$HOME"], 7)[1:] == [
        "DEEPRES=('/a b/python' -m deepres)", "CONFIG=", "ARGS=(--x '$HOME')", "SIGNAL_LEAD=7", "POINT=()",
    ]


def test_the_template_by_hand_is_the_packaged_template_and_valid_bash():
    by_hand = REPO / "slurm" / "deepres.sbatch"
    assert by_hand.resolve() == (REPO / "deepres" / "slurm" / "deepres.sbatch").resolve()
    subprocess.run(["bash", "-n", str(by_hand)], check=True)
    text = by_hand.read_text()
    for option in ("--signal=USR1@", "--requeue", "--open-mode=append", "--ntasks-per-node="):
        assert f"#SBATCH {option}" in text
    assert re.search(r"^srun .*\"\$\{cmd\[@\]\}\"$", text, re.M)


# ============================================================================ resuming (pure, on files)
# ===================================================== the requeue callback in a real (one-process) Trainer
class _TinyRegression(LightningModule):
    """Sends itself the requeue signal once, during step `signal_at`, like SLURM would."""

    def __init__(self, signal_at: int) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.signal_at = signal_at
        self.signalled = False

    def training_step(self, batch, batch_idx):
        if self.global_step == self.signal_at and not self.signalled:
            self.signalled = True
            os.kill(os.getpid(), signal.SIGUSR1)
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture
def fake_slurm_job(monkeypatch, tmp_path):
    """The environment of rank 0 of a SLURM job that cannot requeue itself (no scontrol); restores the signal
    handler and the module state afterwards."""
    monkeypatch.setenv("SLURM_JOB_ID", "999999")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.delenv("SLURM_JOB_NAME", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)  # keep Lightning's own SLURM detection out
    # No scontrol on PATH, as in a container without the SLURM client: the requeue fails at once.
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    previous = signal.getsignal(signal.SIGUSR1)
    monkeypatch.setattr(requeue, "_state", requeue._RequeueState())
    yield
    signal.signal(signal.SIGUSR1, previous)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_signal_during_training_saves_a_complete_checkpoint_at_the_next_step(tmp_path, fake_slurm_job, capfd,
                                                                            accumulate):
    assert requeue.install_early_signal_handler()
    data = DataLoader(TensorDataset(torch.randn(128, 4), torch.randn(128, 1)), batch_size=4)
    checkpoint = RunCheckpoint(tmp_path / "checkpoints", every_minutes=None, requeue=SlurmRequeue(lead=0))
    trainer = Trainer(max_steps=8, max_epochs=1, default_root_dir=tmp_path, callbacks=[checkpoint],
                      accumulate_grad_batches=accumulate, plugins=[CheckpointFiles()],
                      logger=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(_TinyRegression(signal_at=3), data)

    saved = tmp_path / "checkpoints" / "last.ckpt"
    assert damage(saved) is None
    # Saved right after the optimizer step during which the signal came (never inside an accumulation).
    assert load_checkpoint(saved)["global_step"] == 4
    assert not list((tmp_path / "checkpoints").glob(".*"))  # no temporary left
    # Training stops there (the requeue comes after the loggers have finished); this requeue failed, and says so.
    assert trainer.global_step == 4 and checkpoint.stopped_by == "SIGUSR1"
    err = capfd.readouterr()
    assert "scontrol requeue 999999" in err.err and "step 4: saved" in err.out
    assert "the job is not requeued; training stopped at step 4" in err.out


def test_early_signal_is_recorded_and_requeue_is_attempted_before_training(fake_slurm_job, capfd):
    assert requeue.install_early_signal_handler()
    os.kill(os.getpid(), signal.SIGUSR1)  # before any Trainer exists: the process must survive it
    assert requeue.requeue_requested()
    err = capfd.readouterr().err
    assert "before training started" in err and "scontrol requeue 999999" in err


def test_a_job_does_not_use_the_wandb_service_of_the_process_that_submitted_it(tmp_path):
    """sbatch exports the submitter's environment; a WANDB_SERVICE in it names a service on another machine (here:
    one that is gone). Connecting to it fails, and a shared service keeps a killed attempt's run id registered
    ("run ID ... is in use" on the restart). The job must start its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update({"SLURM_JOB_ID": "4242", "SLURM_PROCID": "0", "SLURM_JOB_NAME": "t", "WANDB_MODE": "offline",
                "WANDB_SERVICE": f"3-1-unix-{tmp_path / 'gone' / 'socket'}", "OMP_NUM_THREADS": "1",
                "PATH": f"{tmp_path / 'no-slurm-client'}:{env['PATH']}"})
    result = subprocess.run([PYTHON, "-m", "deepres", "fit", "--run.root", str(tmp_path / "runs"), "--run.name", "w",
                             "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--model.depth", "3",
                             *QUIET], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "could not start run" not in result.stderr + result.stdout
    run_id = (tmp_path / "runs" / "w" / "wandb_run_id").read_text().strip()
    assert len(list((tmp_path / "runs" / "w" / "wandb").glob(f"offline-run-*-{run_id}"))) == 1


# =========================================================================== the local SLURM cluster
SCRIPT = REPO / "scripts" / "slurm_local.sh"


def _free_port_range(count: int) -> int:
    """A base port with `count` free consecutive ports (other test sessions may run a cluster too)."""
    import random
    import socket

    for _ in range(50):
        # Above the template's MASTER_PORT range (10000-29999), below the ephemeral range (32768-).
        base = random.randrange(30000, 32700)
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port range for the test cluster")


def _cluster_env(directory: Path, nodes: int) -> dict[str, str]:
    # Two CPUs per node whatever the machine has, so 1 node x 2 tasks always fits.
    return {**os.environ, "DEEPRES_SLURM_DIR": str(directory), "NODES": str(nodes), "CPUS_PER_NODE": "2",
            "SLURM_LOCAL_PORT": str(_free_port_range(nodes + 1)), "SLURM_CONF": str(directory / "slurm.conf")}


def _start_cluster(env: dict[str, str]) -> None:
    started = subprocess.run([str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=600)
    if started.returncode != 0:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        raise RuntimeError(f"scripts/slurm_local.sh start failed:\n{started.stderr[-3000:]}")
    assert f"export SLURM_CONF={env['SLURM_CONF']}" in started.stdout


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> dict[str, str]:
    """A two-node SLURM cluster on this machine for the whole session; the environment its clients need."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs slurmd as root; run the tests as root (CI does)")
    installed = subprocess.run([str(SCRIPT), "install"], capture_output=True, text=True, timeout=900)
    if installed.returncode != 0:
        pytest.skip(f"SLURM's Debian packages cannot be installed here:\n{installed.stderr[-2000:]}")
    env = _cluster_env(tmp_path_factory.mktemp("slurm"), nodes=2)
    _start_cluster(env)
    try:
        yield env
    finally:
        subprocess.run([str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)


def _daemon_pids(directory: Path) -> dict[str, int]:
    files = [directory / "munge" / "munged.pid", *sorted((directory / "run").glob("*.pid"))]
    return {f.stem: int(f.read_text()) for f in files if f.exists()}


def _runs(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.slurm
def test_local_cluster_stop_ends_exactly_the_daemons_it_started(slurm_cluster, tmp_path):
    env = _cluster_env(tmp_path / "second", nodes=1)
    _start_cluster(env)
    mine = _daemon_pids(tmp_path / "second")
    assert set(mine) == {"munged", "slurmctld", "slurmd-node1"} and all(map(_runs, mine.values()))
    assert "node1" in subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True,
                                     text=True, check=True).stdout
    subprocess.run([str(SCRIPT), "stop"], env=env, check=True, capture_output=True, timeout=120)
    assert not any(map(_runs, mine.values()))
    others = _daemon_pids(Path(slurm_cluster["DEEPRES_SLURM_DIR"]))  # the session's cluster is untouched
    assert len(others) == 4 and all(map(_runs, others.values()))


# ================================================= end to end: `deepres submit` on the local cluster
# The built-in default job (100-layer Highway MLP on digits), cut to a few steps.
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def _deepres(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "deepres", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _submit(env: dict[str, str], cwd: Path, *args: str) -> str:
    result = _deepres(env, cwd, "submit", "--time", "10", "--signal-lead", "30", *args, *QUIET)
    assert result.returncode == 0, result.stderr
    job_id = re.search(r"^submitted job (\d+)", result.stdout, re.M)[1]
    assert "tail -f runs/" in result.stdout and f"squeue -j {job_id}" in result.stdout
    return job_id


def _job(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env, capture_output=True, text=True,
                         check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _wait_for_job(env: dict[str, str], job_id: str, timeout: float = 400) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while (info := _job(env, job_id))["JobState"] not in FINAL_STATES:
        assert time.monotonic() < deadline, f"job {job_id} still {info['JobState']} after {timeout} s: {info}"
        time.sleep(1)
    return info


def _wait_for_log(log: Path, pattern: str, count: int = 1, timeout: float = 300) -> str:
    """Wait until `pattern` occurs `count` times in the job log; return the log."""
    deadline = time.monotonic() + timeout
    while len(re.findall(pattern, text := log.read_text() if log.exists() else "", re.M)) < count:
        assert time.monotonic() < deadline, f"no {pattern!r} (x{count}) in {log} after {timeout} s:\n{text[-3000:]}"
        time.sleep(0.2)
    return text


def _job_ids(env: dict[str, str]) -> set[str]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i"], env=env, capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def _global_step(checkpoint: Path) -> int:
    return load_checkpoint(checkpoint)["global_step"]


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize(("nodes", "tasks"), [(1, 2), (2, 1)], ids=["1node-2tasks", "2nodes-1task"])
def test_default_job_trains_with_ddp_over_gloo_to_completion(slurm_cluster, tmp_path, nodes, tasks):
    job_id = _submit(slurm_cluster, tmp_path, "--nodes", str(nodes), "--tasks-per-node", str(tasks),
                     "--name", "ddp", "--trainer.max_steps", "4")
    info = _wait_for_job(slurm_cluster, job_id)
    run = tmp_path / "runs" / "ddp"
    log = (run / f"slurm-{job_id}.out").read_text()
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert (info["NumNodes"], info["NodeList"]) == ((str(nodes), "node1") if nodes == 1 else ("2", "node[1-2]"))
    assert "distributed_backend=gloo" in log and "All distributed processes registered. Starting with 2 processes" in log
    assert _global_step(run / "checkpoints" / "last.ckpt") == 4
    trainer = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert (int(trainer["num_nodes"]), int(trainer["devices"])) == (nodes, tasks)
    assert (run / "submit.sbatch").is_file() and f"#SBATCH --nodes={nodes}" in (run / "submit.sbatch").read_text()


@pytest.fixture
def submitters_wandb_service(slurm_cluster):
    """The environment of a process that has a wandb-core service running (a notebook, a test session that used
    wandb): WANDB_SERVICE names it, and sbatch would export it to the job."""
    wandb = str(Path(PYTHON).with_name("wandb"))
    # (This test session's own, if an in-process fit used wandb, is not the one to start from.)
    clean = {k: v for k, v in slurm_cluster.items() if k != "WANDB_SERVICE"}
    started = subprocess.run([wandb, "beta", "core", "start", "--idle-timeout", "10m"], capture_output=True,
                             text=True, timeout=120, env=clean)
    assert started.returncode == 0, started.stderr
    token = started.stdout.strip().splitlines()[-1]
    env = {**clean, "WANDB_SERVICE": token, "WANDB_MODE": "offline"}
    yield env
    subprocess.run([wandb, "beta", "core", "stop"], capture_output=True, timeout=60, env=env)


def _wandb_history(path: Path) -> list[dict]:
    """The history rows (one per wandb.log call) in a wandb run file, as {key: value}."""
    import json

    from test_diagnostics import wandb_records  # the diagnostics tests' reader of wandb's run files

    return [{"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            for record in wandb_records(path) if record.WhichOneof("record_type") == "history"]


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_job_requeues_resumes_from_its_checkpoint_and_ends_at_the_right_step(submitters_wandb_service,
                                                                                        tmp_path):
    env = submitters_wandb_service
    max_steps = 16
    job_id = _submit(env, tmp_path, "--nodes", "2", "--tasks-per-node", "1", "--name", "preempt",
                     "--trainer.max_steps", str(max_steps), "--trainer.log_every_n_steps", "1")
    run_dir = tmp_path / "runs" / "preempt"
    log = run_dir / f"slurm-{job_id}.out"
    preempt = ["scancel", "--signal=USR1", job_id]

    # 1. Before training: both ranks have their handler, nothing is trained yet.
    _wait_for_log(log, r"restart 0: SIGUSR1 -> checkpoint and requeue", count=2)
    subprocess.run(preempt, env=env, check=True)
    text = _wait_for_log(log, r"^\[deepres.sbatch\] job \d+ restart 1:")
    assert "before training started: nothing to save, requeueing now" in text
    # 2. Three times during training, in restarts 1, 2 and 3.
    for restart in (1, 2, 3):
        text = _wait_for_log(log, r"^\[deepres.slurm\] training from step \d+", count=restart)
        assert restart > 1 or "no complete checkpoint yet, starting from scratch" in text
        subprocess.run(preempt, env=env, check=True)
        _wait_for_log(log, rf"^\[deepres.sbatch\] job \d+ restart {restart + 1}:")

    info = _wait_for_job(env, job_id)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "4", text[-3000:]
    attempts = re.split(r"^\[deepres.sbatch\] job \d+ restart \d+:", text, flags=re.M)[1:]
    assert len(attempts) == 5
    for before, after in zip(attempts[1:4], attempts[2:5], strict=True):
        # Saved on SIGUSR1 at the next step boundary, stopped there and requeued; the next attempt goes on from it.
        saved_at = int(re.search(r"^\[deepres.slurm\] step (\d+): saved \S*/checkpoints/last.ckpt$", before, re.M)[1])
        assert 1 <= saved_at < max_steps and "requeued SLURM job" in before
        assert "collective operation failed" not in before  # the requeue's SIGTERM finds every rank done
        assert "resuming from" in after and "checkpoints/last.ckpt" in after
        assert f"[deepres.slurm] training from step {saved_at}\n" in after  # nothing lost, nothing repeated
    assert _global_step(run_dir / "checkpoints" / "last.ckpt") == max_steps

    # One wandb run across the requeues, logged by each attempt's own service, and a sync command for all of it.
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    sessions = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(sessions) >= 4 and sorted((run_dir / "wandb").glob("offline-run-*")) == sessions
    assert "could not start run" not in text and "Traceback" not in text, text[-3000:]
    # Each attempt finished its wandb session before requeueing: the requeue's SIGTERM found no service to end.
    assert "lost its wandb service" not in text, text[-3000:]
    sync = re.findall(r"^    wandb sync (.+)$", text, re.M)[-1].split()
    assert [(tmp_path / p).resolve() for p in sync] == [s.resolve() for s in sessions]  # all of them, in order
    # The run's history, read back from the offline files: every training row of metrics.csv exactly once.
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    logged = [int(r["step"]) for r in rows if any(v for k, v in r.items() if k.startswith("train/"))]
    history = [row for session in sessions for row in _wandb_history(session / f"run-{run_id}.wandb")]
    in_wandb = [row["trainer/global_step"] for row in history if any(k.startswith("train/") for k in row)]
    per_session = [len(_wandb_history(session / f"run-{run_id}.wandb")) for session in sessions]
    print(f"WANDB run {run_id}: {len(sessions)} sessions with {per_session} history rows; train rows: "
          f"{len(in_wandb)} in wandb, {len(logged)} in metrics.csv (steps {logged[0]}..{logged[-1]})")
    assert len(logged) >= max_steps - 1 and sorted(in_wandb) == logged, (in_wandb, logged)
    print(f"FAULT slurm preemption x3 (--signal=USR1): 0 steps lost; the wandb run has {len(in_wandb)} of "
          f"{len(logged)} logged training steps, each once")


@pytest.mark.slurm
@pytest.mark.slow
def test_a_node_set_down_mid_job_requeues_it_and_it_resumes_from_the_last_checkpoint(slurm_cluster, tmp_path):
    max_steps = 200
    job_id = _submit(slurm_cluster, tmp_path, "--nodes", "1", "--tasks-per-node", "1", "--name", "down",
                     "--trainer.max_steps", str(max_steps), "--run.checkpoint_every_n_steps", "10",
                     "--wandb.enabled", "false")
    run_dir = tmp_path / "runs" / "down"
    log = run_dir / f"slurm-{job_id}.out"
    _wait_for_log(log, r"^\[deepres.slurm\] training from step 0")
    deadline = time.monotonic() + 120
    while find_resume_checkpoint(run_dir)[1] < 20:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    node = _job(slurm_cluster, job_id)["NodeList"]
    update = ["scontrol", "update", f"NodeName={node}", "Reason=deepres-test"]
    subprocess.run([*update, "State=DOWN"], env=slurm_cluster, check=True)
    down_at = time.monotonic()
    # An emulated node answers at once and would return to service (ReturnToService=2) while its slurmd still
    # stops the old attempt; SLURM would then drain it for a duplicate job id. A dead node stays away: drain it.
    subprocess.run([*update, "State=DRAIN"], env=slurm_cluster, check=True)
    try:
        info = _wait_for_job(slurm_cluster, job_id, timeout=400)
    finally:
        subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], env=slurm_cluster)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, text[-3000:]
    restart = text.split("restart 1:", 1)[1]
    resumed = int(re.search(r"\[deepres.slurm\] training from step (\d+)", restart)[1])
    assert resumed >= 20 and "resuming from" in restart
    print(f"FAULT node down: resumed at step {resumed}, {time.monotonic() - down_at:.0f} s from DOWN to COMPLETED "
          "(interval: 10 steps)")
    assert _global_step(run_dir / "checkpoints" / "last.ckpt") == max_steps


@pytest.mark.slurm
@pytest.mark.slow
def test_scancel_without_a_signal_checkpoints_within_the_grace_period_and_exits_cleanly(slurm_cluster, tmp_path):
    job_id = _submit(slurm_cluster, tmp_path, "--nodes", "1", "--tasks-per-node", "1", "--name", "cancel",
                     "--trainer.max_steps", "100000", "--trainer.max_epochs", "-1", "--wandb.enabled", "false")
    run_dir = tmp_path / "runs" / "cancel"
    log = run_dir / f"slurm-{job_id}.out"
    _wait_for_log(log, r"^\[deepres.slurm\] training from step 0")
    deadline = time.monotonic() + 120
    while find_resume_checkpoint(run_dir)[1] < 22:  # an epoch end
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], env=slurm_cluster, check=True)  # SIGTERM, SIGKILL KillWait s later
    info = _wait_for_job(slurm_cluster, job_id, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "CANCELLED", text[-3000:]
    saved = int(re.search(r"SIGTERM: saved \S*/checkpoints/last.ckpt at step (\d+); stopping", text)[1])
    assert _global_step(run_dir / "checkpoints" / "last.ckpt") == saved > 22
    assert "Traceback" not in text
    print(f"FAULT scancel: saved at step {saved}, 0 steps lost, {info['RunTime']} run time")


@pytest.mark.slurm
def test_submit_refuses_tasks_per_node_that_contradict_devices_and_submits_nothing(slurm_cluster, tmp_path):
    before = _job_ids(slurm_cluster)
    result = _deepres(slurm_cluster, tmp_path, "submit", "--tasks-per-node", "2", "--name", "bad",
                      "--trainer.devices", "1")
    assert result.returncode == 2
    assert "--tasks-per-node 2 disagrees with trainer.devices=1" in result.stderr
    assert "Fix: pass --trainer.devices 2, or --tasks-per-node 1" in result.stderr
    assert "Traceback" not in result.stderr
    assert not _job_ids(slurm_cluster) - before  # no new job (finished ones may age out of the list meanwhile)
    assert not (tmp_path / "runs" / "bad").exists()


@pytest.mark.slurm
def _accepted_by_bash_and_sbatch(result, tmp_path, env) -> None:
    """A `deepres submit --dry-run` printed a script that bash parses and sbatch --test-only accepts."""
    assert result.returncode == 0, result.stderr
    script = tmp_path / "dry.sbatch"
    script.write_text(result.stdout)
    subprocess.run(["bash", "-n", str(script)], check=True)
    test_only = subprocess.run(["sbatch", "--test-only", str(script)], env=env, capture_output=True, text=True)
    assert test_only.returncode == 0 and "to start at" in test_only.stderr, test_only.stderr


def test_dry_run_prints_a_valid_script_and_submits_nothing(slurm_cluster, tmp_path):
    before = _job_ids(slurm_cluster)
    result = _deepres(slurm_cluster, tmp_path, "submit", "--nodes", "2", "--tasks-per-node", "1", "--time", "5",
                      "--name", "dry", "--dry-run", "--trainer.max_steps", "3")
    _accepted_by_bash_and_sbatch(result, tmp_path, slurm_cluster)
    assert "--trainer.num_nodes 2" in result.stdout and "--run.name dry" in result.stdout
    assert not _job_ids(slurm_cluster) - before  # no new job (finished ones may age out of the list meanwhile)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_a_sweep_is_one_job_array_whose_preempted_task_resumes_alone(slurm_cluster, tmp_path):
    env = {**slurm_cluster, "WANDB_MODE": "offline"}
    max_steps = 300
    result = _deepres(env, tmp_path, "submit", "--time", "15", "--signal-lead", "30", "--tasks-per-node", "1",
                      "--name", "sweep", "--array-limit", "2", "--sweep", "model.depth=50,100",
                      "--sweep", "model.gate=highway,residual", "--", "--trainer.max_steps", str(max_steps),
                      "--trainer.max_epochs", "-1", "--run.checkpoint_every_n_steps", "25", *QUIET)
    assert result.returncode == 0, result.stderr
    array = re.search(r"^submitted job array (\d+): 4 points \(tasks 0-3, at most 2 at once\)", result.stdout, re.M)[1]
    sweep_dir = tmp_path / "runs" / "sweep"
    names = ["depth=50,gate=highway", "depth=50,gate=residual", "depth=100,gate=highway", "depth=100,gate=residual"]
    assert [p["name"] for p in __import__("json").loads((sweep_dir / "sweep.json").read_text())["points"]] == names

    # Preempt task 1 while it trains; the others are not touched.
    log1 = sweep_dir / f"slurm-{array}_1.out"
    _wait_for_log(log1, r"^\[deepres.slurm\] training from step 0")
    deadline = time.monotonic() + 120
    while find_resume_checkpoint(sweep_dir / names[1])[1] < 25:
        assert time.monotonic() < deadline, log1.read_text()[-3000:]
        time.sleep(0.2)
    # What SLURM does to a preempted task (PreemptMode=REQUEUE): SIGTERM, requeue, start again.
    subprocess.run(["scontrol", "requeue", f"{array}_1"], env=env, check=True)

    infos = [_wait_for_job(env, f"{array}_{task}") for task in range(4)]
    for task, info in enumerate(infos):
        log = (sweep_dir / f"slurm-{array}_{task}.out").read_text()
        assert info["JobState"] == "COMPLETED", log[-3000:]
        assert info["Restarts"] == ("1" if task == 1 else "0"), (task, info["Restarts"])
        assert "Traceback" not in log, log[-3000:]  # the SIGTERM of the preemption ends wandb's service too
        assert f"[deepres.sbatch] job {array}_{task} restart 0:" in log  # the array task id, not the job id
        assert _global_step(sweep_dir / names[task] / "checkpoints" / "last.ckpt") == max_steps
        assert (sweep_dir / names[task] / "finished.json").is_file()
        assert f"--model.depth {names[task].split(',')[0].split('=')[1]}" in log
    log1 = log1.read_text()
    before, after = log1.split(f"[deepres.sbatch] job {array}_1 restart 1:", 1)
    saved = int(re.search(r"SIGTERM: saved \S*/checkpoints/last.ckpt at step (\d+); stopping", before)[1])
    assert saved >= 25
    assert f"[deepres.slurm] training from step {saved}" in after and "resuming from" in after
    # One run directory per point, nothing else beside them.
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == sorted(names)

    summary = _deepres(env, tmp_path, "sweep-summary", str(sweep_dir))
    assert summary.returncode == 0, summary.stderr
    rows = [line for line in summary.stdout.splitlines() if re.match(r"\| \d ", line)]
    assert [row.split(" | ")[3:6] for row in rows] == [["finished", str(max_steps), "1" if i == 1 else "0"]
                                                        for i in range(4)]
    assert "4 of 4 points finished" in summary.stdout
    print(f"SWEEP array {array}: task 1 preempted after step {saved}, resumed from it\n{summary.stdout}")


@pytest.mark.slurm
def test_dry_run_of_a_sweep_with_memory_and_site_setup_passes_bash_and_sbatch_test_only(slurm_cluster, tmp_path):
    setup = tmp_path / "site.sh"
    setup.write_text("export DEEPRES_SITE=1\n")
    before = _job_ids(slurm_cluster)
    result = _deepres(slurm_cluster, tmp_path, "submit", "--tasks-per-node", "1", "--time", "5", "--mem", "100M",
                      "--setup", str(setup), "--python", PYTHON, "--name", "dry-sweep", "--dry-run",
                      "--sweep", "model.depth=3,5", "--array-limit", "1", "--", "--trainer.max_steps", "3")
    _accepted_by_bash_and_sbatch(result, tmp_path, slurm_cluster)
    for line in ("#SBATCH --mem=100M", "#SBATCH --array=0-1%1", "export DEEPRES_SITE=1"):
        assert line in result.stdout.splitlines()
    assert not _job_ids(slurm_cluster) - before and not (tmp_path / "runs").exists()  # (old jobs may age out)
