"""`deepres fit`: data modules, the default job's pieces, run directories, exact resume, clear errors."""

import csv
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepres.data import DigitsDataModule
from deepres.data.base import ResumableSampler
from deepres.data.sequence import adding_sequence, temporal_order_sequence
from deepres.training.cli import main
from deepres.training.run_dir import claim_new_run_dir, job_run_dir, release_run_dir_locks

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--trainer.log_every_n_steps", "1"]

def fit(tmp_path: Path, *args: str, name: str = "t") -> Path:
    """Run `deepres fit` in this process; the run directory it wrote (`name`, or `name-N` for a new run whose
    name was taken)."""
    rc = main(["fit", "--run.root", str(tmp_path / "runs"), "--run.name", name, *QUIET, *args])
    assert rc == 0
    runs = [p for p in (tmp_path / "runs").glob(f"{name}*")
            if (p.name == name or p.name[len(name) + 1:].isdigit()) and (p / "metrics.csv").exists()]
    return max(runs, key=lambda p: (p / "metrics.csv").stat().st_mtime)

def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))

def deterministic_rows(run_dir: Path) -> list[dict]:
    rows = [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in read_metrics(run_dir)]
    return [r for r in rows if any(v for k, v in r.items() if k not in ("step", "epoch"))]


# ---------------------------------------------------------------- the default job's pieces
def test_digits_split_is_fixed_and_stratified():
    dm = DigitsDataModule()
    dm.setup()
    assert len(dm.train_set) == 1437 and len(dm.val_set) == 360
    x, y = dm.train_set[0]
    assert x.shape == (64,) and dm.input_shape == (64,) and dm.num_classes == 10
    counts = torch.bincount(dm.val_set.tensors[1], minlength=10)
    assert counts.min() >= 35  # stratified: 36 +- 1 per class
    dm2 = DigitsDataModule(layout="image", seed=5)
    dm2.setup()
    assert dm2.train_set[0][0].shape == (1, 8, 8)
    assert torch.equal(dm2.val_set.tensors[1], dm.val_set.tensors[1])  # same split whatever the seed

def test_default_job_is_a_100_layer_highway_mlp(tmp_path):
    from deepres.training import Classifier

    model = Classifier(num_classes=10, input_shape=(64,))
    assert type(model.net).__name__ == "HighwayMLP"
    assert len(model.net.blocks) == 99 and model.net.blocks[0].gate == "highway"

def test_sampler_splits_ranks_evenly_and_resumes():
    full = [list(ResumableSampler(10, True, seed=3, rank=r, world=3)) for r in range(3)]
    assert all(len(p) == 4 for p in full)  # ceil(10 / 3), padded
    assert set(sum(full, [])) == set(range(10))
    s = ResumableSampler(10, True, seed=3)
    s.set_epoch(1)
    order = list(s)
    s.skip = 4
    assert list(s) == order[4:] and list(s) == order  # the skip applies once

def test_sequence_tasks_follow_the_paper():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x, y = adding_sequence(100, g)
        assert x.shape == (100, 2) and 0 <= float(y) <= 1
        marked = (x[:, 1] == 1).nonzero().flatten().tolist()
        assert len(marked) == 2 and marked[0] < 10 and marked[1] < 49
        x1 = 0.0 if marked[0] == 0 else float(x[marked[0], 0])
        assert abs(float(y) - (0.5 + (x1 + float(x[marked[1], 0])) / 4)) < 1e-6
        s, c = temporal_order_sequence(100, g)
        sym = s.argmax(1)
        assert sym[0] == 6 and sym[-1] == 7
        xy = [int(v) - 4 for v in sym if v in (4, 5)]
        assert len(xy) == 2 and int(c) == 2 * xy[0] + xy[1]



def test_auto_forget_bias_keeps_the_cell_state_over_the_sequence():
    from deepres.errors import ConfigError
    from deepres.training import SequenceModule

    for seq_len in (100, 1000):
        module = SequenceModule(cell="1999", forget_bias="auto", input_shape=(seq_len, 2))
        cell = next(m for m in module.net.modules() if hasattr(m, "has_forget_gate"))
        bias = cell.input_proj.bias[3 * cell.hidden_size:]
        assert torch.allclose(bias, torch.full_like(bias, np.log(seq_len) + 1))
        assert abs(torch.sigmoid(bias[0]).item() ** seq_len - np.exp(-1 / np.e)) < 0.01  # the state kept over T steps
    with pytest.raises(ConfigError, match="forget_bias='open'.*'auto'"):
        SequenceModule(forget_bias="open")

# ---------------------------------------------------------------- a short fit per data module
def write_fake_cifar(root: Path, n: int = 64) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root

@pytest.mark.parametrize(
    "args",
    [
        ["--model.depth", "5"],
        ["--data.layout", "image", "--model.arch", "resnet20_cifar", "--model.depth", "8"],
        ["--model.class_path", "deepres.training.SequenceModule", "--data", "deepres.data.SequenceDataModule",
         "--data.seq_len", "20", "--model.hidden_size", "8"],
        ["--model.class_path", "deepres.training.SequenceModule", "--data", "deepres.data.SequenceDataModule",
         "--data.task", "temporal_order", "--data.seq_len", "30", "--model.cell", "1997", "--model.hidden_size", "8"],
        ["--data", "deepres.data.SyntheticDataModule", "--data.image_size", "16", "--model.arch", "highway_cnn_cifar",
         "--model.arch_args", "{widths: [4, 8], blocks_per_stage: [1, 1]}"],
        ["--data", "deepres.data.CIFARDataModule", "--data.data_dir", "CIFAR", "--data.num_workers", "0",
         "--data.batch_size", "16", "--model.arch", "preact_resnet_cifar", "--model.depth", "11"],
    ],
    ids=["digits-mlp", "digits-cnn", "adding", "temporal-order", "synthetic", "cifar"],
)
def test_two_step_fit(tmp_path, args):
    args = [str(write_fake_cifar(tmp_path / "cifar")) if a == "CIFAR" else a for a in args]
    run = fit(tmp_path, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "2", *args)
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "config.yaml").exists() and (run / "run_info.json").exists()
    rows = read_metrics(run)
    assert rows and any(r.get("train/loss") for r in rows)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 2

# ---------------------------------------------------------------- exact resume
def assert_same_training(whole: Path, split: Path) -> None:
    """Bit-identical final parameters and optimizer state, and metrics.csv identical row for row (the
    wall-clock perf/* columns aside)."""
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    worst = max((a["state_dict"][k].double() - b["state_dict"][k].double()).abs().max().item() for k in a["state_dict"])
    assert worst == 0.0, f"final parameters differ by up to {worst}"
    for pa, pb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values(), strict=True):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    rows_a, rows_b = deterministic_rows(whole), deterministic_rows(split)
    assert len(rows_a) == len(rows_b) > 5
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra == rb


SMALL = ["--model.depth", "6", "--data.batch_size", "64"]  # digits: 22 steps per epoch


def test_the_schedule_reads_its_horizon_only_past_the_warm_up():
    """Building the scheduler evaluates step 0; the horizon (which builds the training loader when Lightning
    has none yet) must not be read then, only once training is under way."""
    from deepres.training.config import ScheduleConfig
    from deepres.training.optim import lr_lambda

    reads = []
    factor = lr_lambda(ScheduleConfig(name="cosine", warmup_steps=2), total_steps=lambda: reads.append(1) or 12)
    assert [factor(step) for step in (0, 1, 2)] == [0.5, 1.0, 1.0] and not reads
    assert factor(7) == pytest.approx(0.5) and reads  # half-way from step 2 to 12


def test_resume_is_exact(tmp_path):
    """2N steps in one go == N steps, then resumed for N more (N = 30 is mid-epoch: 22 steps/epoch)."""
    common = [*SMALL, "--model.schedule.name", "step", "--model.schedule.milestones", "[40]",
              "--trainer.max_epochs", "-1"]
    whole = fit(tmp_path, *common, "--trainer.max_steps", "60", name="whole")
    fit(tmp_path, *common, "--trainer.max_steps", "30", name="split")
    split = fit(tmp_path, *common, "--trainer.max_steps", "60", "--ckpt_path", "last", name="split")
    assert split.name == "split"  # the same run directory, not a new one
    assert_same_training(whole, split)


@pytest.mark.parametrize("stop_at", [30, 22], ids=["mid-epoch", "epoch-end"])
def test_default_job_stopped_and_resumed_trains_exactly_as_one_uninterrupted_run(tmp_path, stop_at):
    """The default job's path: max_epochs set and the cosine schedule over the whole run. A SIGTERM after step
    30 saves last.ckpt 8 batches into the second epoch; the resumed run must train on the epoch's other 14
    batches, in order, with the learning rates of steps 31..44. After step 22 (the first epoch's last batch) the
    checkpoint comes before that epoch's validation."""
    common = [*SMALL, "--trainer.max_epochs", "2"]
    whole = fit(tmp_path, *common, name="whole")
    stopped = main(["fit", "--run.root", str(tmp_path / "runs"), "--run.name", "split", *QUIET, *common,
                    "--trainer.callbacks+=_signal_at_step.SignalAtStep", f"--trainer.callbacks.step={stop_at}"])
    assert stopped == 128 + signal.SIGTERM
    split = tmp_path / "runs" / "split"
    assert torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == stop_at
    fit(tmp_path, *common, "--ckpt_path", "last", name="split")
    assert_same_training(whole, split)

def test_a_resume_from_an_epochs_last_batch_then_a_stop_inside_the_next_epoch_trains_exactly_once(tmp_path):
    """Stopped after step 22 (the first epoch's last batch, saved before its validation), resumed, stopped again
    after step 26 (inside the second epoch) and resumed: the second resume must skip the 4 batches already
    trained, not train the epoch again from its start (it did: 48 steps instead of 44). Logging every 10 steps,
    the attempt from 22 to 26 logs no step: it must not write a row of its own either."""
    common = [*SMALL, "--trainer.max_epochs", "2", "--trainer.log_every_n_steps", "10"]
    whole = fit(tmp_path, *common, name="whole")
    runs = ["fit", "--run.root", str(tmp_path / "runs"), "--run.name", "split", *QUIET, *common]
    signal_at = ["--trainer.callbacks+=_signal_at_step.SignalAtStep", "--trainer.callbacks.step"]
    assert main([*runs, *signal_at, "22"]) == 128 + signal.SIGTERM
    assert main([*runs, *signal_at, "26", "--ckpt_path", "last"]) == 128 + signal.SIGTERM
    split = fit(tmp_path, *common, "--ckpt_path", "last", name="split")
    assert _step(split) == 44
    assert_same_training(whole, split)


TINY = ["--model.depth", "3", "--trainer.limit_val_batches", "1", "--wandb.enabled", "false"]


def _step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


def test_new_run_with_a_taken_name_gets_a_new_directory_and_a_resume_goes_to_the_name_as_written(tmp_path):
    first = fit(tmp_path, *TINY, "--trainer.max_steps", "2")
    second = fit(tmp_path, *TINY, "--trainer.max_steps", "1")
    assert first.name == "t" and second.name == "t-2"
    # --run.name t --ckpt_path last resumes runs/t, not its newer sibling t-2
    assert fit(tmp_path, *TINY, "--trainer.max_steps", "3", "--ckpt_path", "last") == first
    assert _step(first) == 3 and _step(second) == 1


def test_a_failed_start_leaves_no_directory_and_a_killed_ones_leftovers_are_reused(tmp_path):
    runs = tmp_path / "runs"
    first = fit(tmp_path, *TINY, "--trainer.max_steps", "2")
    # refused by the run plan before any directory is claimed
    assert main(["fit", "--run.root", str(runs), "--run.name", "t", *QUIET, *TINY, "--trainer.max_epochs", "-2"]) == 2
    assert sorted(p.name for p in runs.iterdir()) == ["t"]
    # what a start killed before its first step leaves: nobody holds it, nothing trained is in it
    leftover = runs / "t-2"
    leftover.mkdir()
    (leftover / ".claimed").write_text("node9 4242 2026-01-01T00:00:00\n")
    (leftover / "config.yaml").write_text("seed_everything: 0\n")
    assert fit(tmp_path, *TINY, "--trainer.max_steps", "3", "--ckpt_path", "last") == first and _step(first) == 3
    again = fit(tmp_path, *TINY, "--trainer.max_steps", "1")
    assert again == leftover and "node9" not in (leftover / ".claimed").read_text() and _step(leftover) == 1


def test_a_requeued_slurm_job_finds_the_directory_its_first_start_claimed(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    (runs / "x" / "checkpoints").mkdir(parents=True)
    (runs / "x" / "metrics.csv").write_text("step\n")  # another run's
    monkeypatch.setenv("SLURM_JOB_ID", "4711")
    try:
        claimed = claim_new_run_dir(runs, "x")
        monkeypatch.delenv("SLURM_JOB_ID")
        assert claimed.name == "x-2" and claim_new_run_dir(runs, "x").name == "x-3"  # one process, two claims
    finally:
        release_run_dir_locks()
    assert job_run_dir(runs, "x", "4711") == claimed
    assert job_run_dir(runs, "x", "4712") is None  # another job: a fresh directory, not x's checkpoint

# ---------------------------------------------------------------- clear errors, no traceback
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model.dpeth", "5"], "dpeth"),
        (["--trainer.max_stepz", "5"], "max_stepz"),
        (["--model.arch", "resnet51"], "Did you mean 'resnet50'"),
        (["--model.arch", "resnet20_cifar", "--model.depth", "21", "--data.layout", "image"], "Valid neighbours: 20, 26"),
        (["--data", "deepres.data.CIFARDataModule", "--data.data_dir", "/nonexistent/cifar"],
         "cifar-10-python.tar.gz"),
        (["--model.depth", "3", "--trainer.accelerator", "cpu", "--trainer.devices", "4",
          "--trainer.strategy", "deepres.strategies.PipelineStrategy", "--trainer.strategy.stages", "4"],
         "only 2 blocks"),
    ],
    ids=["unknown-model-key", "unknown-trainer-key", "unknown-model", "invalid-depth", "missing-cifar",
         "pipeline-stages"],
)
def test_bad_input_gives_one_clear_message(tmp_path, args, fragment):
    proc = subprocess.run(
        [sys.executable, "-m", "deepres", "fit", "--run.root", str(tmp_path), *args],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert fragment in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    # a run refused before it started leaves no run directory (the next try gets the same name)
    assert not list(tmp_path.glob("default*")), list(tmp_path.iterdir())


class _RunsCommand:
    """Unpickling it would run a shell command: what a crafted weights file does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def _bad_file(inputs: Path, kind: str) -> Path:
    path = inputs / {"empty-yaml": "empty.yaml", "yaml-list": "list.yaml", "plain-pickle": "plain.pkl",
                     "crafted-pickle": "crafted.pt", "saved-list": "list.pt", "not-torch": "text.pt"}[kind]
    if kind == "empty-yaml":
        path.write_text("")
    elif kind == "yaml-list":
        path.write_text("- model\n- data\n")
    elif kind == "plain-pickle":
        path.write_bytes(pickle.dumps({"net.weight": [1.0, 2.0]}))
    elif kind == "crafted-pickle":
        torch.save({"net.weight": _RunsCommand(f"touch {inputs / 'ran'}")}, path)
    elif kind == "saved-list":
        torch.save([torch.zeros(2)], path)
    else:
        path.write_text("weights: none\n")
    return path


@pytest.mark.parametrize("option, kind, fragment", [
    ("--config", "empty-yaml", "empty.yaml: the file is empty. A config file is a YAML mapping of sections"),
    ("--config", "yaml-list", "list.yaml: its top level is a list, not a mapping."),
    ("--model.init_from", "plain-pickle", "plain.pkl' is not a torch.save file of tensors."),
    ("--model.init_from", "crafted-pickle", "crafted.pt' would call `posix.system` (loading it could run code)."),
    ("--model.init_from", "saved-list", "list.pt' holds no state dict of tensors."),
    ("--model.init_from", "not-torch", "text.pt' is not a torch.save file of tensors."),
])
def test_a_bad_config_or_weights_file_gives_one_line_and_writes_nothing(tmp_path, capsys, option, kind, fragment):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    runs = tmp_path / "runs"
    rc = main(["fit", "--run.root", str(runs), *QUIET, "--wandb.enabled", "false", "--trainer.max_steps", "1",
               option, str(_bad_file(inputs, kind))])
    err = capsys.readouterr().err
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("deepres: error:")]
    assert len(errors) == 1 and fragment in errors[0], err
    assert "Traceback" not in err
    assert not (inputs / "ran").exists()  # the crafted pickle's command never ran
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


def test_progress_bar_redraws_a_few_times_per_second_not_every_step(monkeypatch):
    from deepres.training.progress import ThrottledProgressBar

    clock = iter([0.0, 0.05, 0.1, 0.15, 0.25, 0.3, 0.31])
    monkeypatch.setattr("deepres.training.progress.time.monotonic", lambda: next(clock))
    bar = ThrottledProgressBar(min_interval=0.2)
    drawn = [step for step in range(1, 8) if bar._should_update(step, total=7)]
    assert drawn == [1, 5, 7]  # the first, the first 0.2 s later, and the last step of the loop
