"""`deepres submit`'s options rendered into the script (pure, and with bash -n), `--`, and sweep points."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from deepres.errors import ConfigError
from deepres.slurm.render import render
from deepres.slurm.request import ClusterRequest, ProcessLayout, plan
from deepres.slurm.submit import main as submit_main
from deepres.slurm.submit import split_passthrough
from deepres.slurm.sweep import Sweep

PYTHON = sys.executable


def _script(tmp_path: Path, request: ClusterRequest, **kwargs) -> str:
    checked = plan(request, ProcessLayout(accelerator="auto"))
    script = render(request, checked, name="r", run_dir=tmp_path / "runs" / "r", workdir=tmp_path,
                    deepres=kwargs.pop("deepres", ["python", "-m", "deepres"]), config=None, args=[], **kwargs)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)
    return script


def _sbatch_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_gres_asks_for_the_gpus_instead_of_gpus_per_node(tmp_path):
    script = _script(tmp_path, ClusterRequest(gres="gpu:a100:4"))
    lines = _sbatch_lines(script)
    assert "#SBATCH --gres=gpu:a100:4" in lines and "#SBATCH --ntasks-per-node=4" in lines
    assert not [line for line in lines if "--gpus-per-node" in line]
    assert plan(ClusterRequest(gres="gpu:2"), ProcessLayout()).trainer_overrides == [
        "--trainer.devices", "2", "--trainer.accelerator", "gpu"]


@pytest.mark.parametrize(("request_", "message"), [
    (ClusterRequest(gres="gpu:2", gpus_per_node=2), "two requests for the same GPUs"),
    (ClusterRequest(gres="gpu:2", tasks_per_node=3), "disagree: deepres runs one task per GPU"),
    (ClusterRequest(gres="mps:100"), "gpu:COUNT or gpu:TYPE:COUNT"),
    (ClusterRequest(mem="64G", mem_per_cpu="4G"), "SLURM takes one memory request"),
    (ClusterRequest(mem="lots"), "give a size such as 64G"),
    (ClusterRequest(mem_per_gpu="80G"), "--mem-per-gpu without GPUs"),
])
def test_contradicting_or_malformed_gpu_and_memory_requests_are_refused(request_, message):
    with pytest.raises(ConfigError, match=message):
        plan(request_, ProcessLayout())


@pytest.mark.parametrize(("request_", "line"), [
    (ClusterRequest(mem="64G"), "#SBATCH --mem=64G"), (ClusterRequest(mem="0"), "#SBATCH --mem=0"),
    (ClusterRequest(mem_per_cpu="4G"), "#SBATCH --mem-per-cpu=4G"),
    (ClusterRequest(gpus_per_node=2, mem_per_gpu="80G"), "#SBATCH --mem-per-gpu=80G"),
])
def test_memory_requests_are_rendered(tmp_path, request_, line):
    script = _script(tmp_path, request_)
    assert line in _sbatch_lines(script) and "site's default applies" not in script


def test_without_a_memory_request_the_script_says_the_site_default_applies(tmp_path):
    script = _script(tmp_path, ClusterRequest())
    assert not [line for line in _sbatch_lines(script) if "--mem" in line]
    assert "# No memory request: the site's default applies" in script


def test_master_port_is_below_the_ephemeral_range_and_differs_between_neighbouring_jobs(tmp_path):
    script = _script(tmp_path, ClusterRequest())
    rendezvous = script.split("# --- rendezvous", 1)[1].split("# --- defaults", 1)[0]
    port_line = next(line for line in rendezvous.splitlines() if line.startswith("export MASTER_PORT"))
    ports = []
    for job_id in (1, 2, 19999, 20000, 32767, 60999, 123456789):
        out = subprocess.run(["bash", "-c", f"SLURM_JOB_ID={job_id}; {port_line}; echo $MASTER_PORT"],
                             capture_output=True, text=True, check=True).stdout
        ports.append(int(out))
    assert all(10000 <= p < 30000 for p in ports), ports  # never in Linux's 32768-60999
    assert len(set(ports[:3])) == 3  # consecutive jobs on one node do not collide


def test_setup_file_lines_go_into_the_marked_block_before_python_starts(tmp_path):
    setup = tmp_path / "site.sh"
    setup.write_text("#!/bin/bash\nmodule load cuda/12.4\nsource /shared/venv/bin/activate\n")
    script = _script(tmp_path, ClusterRequest(), setup=setup)
    block = script.split("# ---- setup:", 1)[1].split("# ---- end setup ----", 1)[0]
    assert "module load cuda/12.4\nsource /shared/venv/bin/activate\n" in block and "#!/bin/bash" not in block
    lines = script.splitlines()
    assert lines.index("set -eo pipefail") < lines.index("module load cuda/12.4") < lines.index("set -u")
    assert lines.index("set -u") < next(i for i, line in enumerate(lines) if line.startswith("DEEPRES="))
    assert "DEEPRES=(python -m deepres)" in lines


def test_a_setup_file_with_sbatch_lines_or_bad_bash_is_refused(tmp_path, capsys):
    setup = tmp_path / "site.sh"
    setup.write_text("module load x\n#SBATCH --mem=4G\n")
    with pytest.raises(ConfigError, match="line 2.*ignored.*deepres submit option"):
        _script(tmp_path, ClusterRequest(), setup=setup)
    setup.write_text("if true; then\n")  # unterminated
    assert submit_main(["--setup", str(setup), "--dry-run", "--tasks-per-node", "1"]) == 2
    assert "not valid bash (the lines from --setup" in capsys.readouterr().err


def test_the_submitting_python_is_marked_as_an_overridable_default(tmp_path):
    script = _script(tmp_path, ClusterRequest(), deepres=[PYTHON, "-m", "deepres"])
    assert "need --python or --setup" in script


def test_double_dash_passes_the_rest_to_deepres_fit():
    assert split_passthrough(["--nodes", "2", "--", "--trainer.max_steps", "7", "--nodes", "3"]) == (
        ["--nodes", "2"], ["--trainer.max_steps", "7", "--nodes", "3"])
    assert split_passthrough(["--nodes", "2"]) == (["--nodes", "2"], [])


def test_submit_dry_run_with_double_dash_renders_the_overrides(tmp_path):
    result = subprocess.run([PYTHON, "-m", "deepres", "submit", "--tasks-per-node", "1", "--dry-run", "--name", "dd",
                             "--", "--trainer.max_steps", "7"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    args = next(line for line in result.stdout.splitlines() if line.startswith("ARGS="))
    assert args.startswith("ARGS=(--trainer.max_steps 7 ") and " -- " not in args


def test_deepres_fit_accepts_double_dash(tmp_path):
    result = subprocess.run([PYTHON, "-m", "deepres", "fit", "--", "--trainer.max_steps", "7", "--print_config"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "max_steps: 7" in result.stdout


# ============================================================================================ sweeps
def test_sweep_points_are_the_product_named_after_their_values():
    sweep = Sweep.parse(["model.depth=10,100", "--model.gate=plain,highway"])
    points = sweep.points()
    assert [p.name for p in points] == ["depth=10,gate=plain", "depth=10,gate=highway",
                                        "depth=100,gate=plain", "depth=100,gate=highway"]
    assert points[3].overrides() == ["--model.depth", "100", "--model.gate", "highway"]
    assert [p.index for p in sweep.checks()] == [0, 2, 1]  # every value of every key, once
    same_last = Sweep.parse(["model.width=1,2", "data.width=3"]).points()
    assert same_last[0].name == "model.width=1,data.width=3"


@pytest.mark.parametrize(("specs", "overrides", "message"), [
    (["depth=1,2"], [], "dotted config key"),
    (["model.depth"], [], "KEY=V1,V2"),
    (["model.depth=1,a/b"], [], "not a plain value"),
    (["model.depth=1,1"], [], "listed twice"),
    (["model.depth=1", "model.depth=2"], [], "given twice"),
    (["trainer.devices=1,2"], [], "same resources"),
    (["model.depth=1,2"], ["--model.depth", "3"], "one would silently win"),
])
def test_bad_sweeps_are_refused(specs, overrides, message):
    with pytest.raises(ConfigError, match=message):
        Sweep.parse(specs, overrides)


def test_a_sweep_renders_one_array_and_each_task_runs_its_own_point(tmp_path):
    sweep = Sweep.parse(["model.depth=3,5", "model.gate=plain,highway"])
    points = [[*p.overrides(), "--run.name", p.name] for p in sweep.points()]
    script = _script(tmp_path, ClusterRequest(tasks_per_node=1), points=points, array_limit=2)
    lines = _sbatch_lines(script)
    assert "#SBATCH --array=0-3%2" in lines
    assert f"#SBATCH --output={tmp_path}/runs/r/slurm-%A_%a.out" in lines
    job = script.split("# ---- job:", 1)[1].split("# ---- end job ----", 1)[0].split("\n", 1)[1]
    for task, point in enumerate(points):
        out = subprocess.run(["bash", "-c", f"SLURM_ARRAY_TASK_ID={task}\n{job}\nprintf '%s\\0' \"${{POINT[@]}}\""],
                             capture_output=True, text=True, check=True).stdout
        assert out.split("\0")[:-1] == point
    outside = subprocess.run(["bash", "-c", f"SLURM_ARRAY_TASK_ID=9\n{job}"], capture_output=True, text=True)
    assert outside.returncode == 2 and "not a point of this sweep" in outside.stderr


def test_sweep_dry_run_resolves_every_value_and_refuses_a_bad_one(tmp_path):
    good = subprocess.run([PYTHON, "-m", "deepres", "submit", "--tasks-per-node", "1", "--dry-run", "--name", "sw",
                           "--sweep", "model.depth=3,5"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert good.returncode == 0, good.stderr
    assert "#SBATCH --array=0-1" in good.stdout and "--run.name depth=5" in good.stdout
    bad = subprocess.run([PYTHON, "-m", "deepres", "submit", "--tasks-per-node", "1", "--dry-run", "--name", "sw",
                          "--sweep", "model.depth=3,deep"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert bad.returncode == 2 and "sweep point depth=deep" in bad.stderr, bad.stderr
    assert not (tmp_path / "runs").exists()


def test_sweep_summary_tabulates_finished_incomplete_and_pending_points_and_plots_one_key(tmp_path):
    from deepres.observability.sweep_summary import main as summary_main

    sweep_dir = tmp_path / "runs" / "sw"
    Sweep.parse(["model.depth=10,100,1000"]).write(sweep_dir, array_limit=None)
    for name, acc in (("depth=10", 0.9), ("depth=100", 0.8)):
        (sweep_dir / name / "finished.json").write_text(json.dumps(
            {"global_step": 50, "metrics": {"val/acc1": acc, "train/loss": 0.1, "depth/act_rms/block_000": 1.0}}))
        (sweep_dir / name / "run_info.json").write_text(json.dumps({"starts": [{}, {}] if acc < 0.9 else [{}]}))
    (sweep_dir / "depth=1000" / "metrics.csv").write_text("epoch,step,train/loss\n0,9,2.3\n")
    assert summary_main([str(sweep_dir)]) == 0
    table = (sweep_dir / "sweep_summary.md").read_text().splitlines()
    assert table[0] == "| task | model.depth | state | step | restarts | val/acc1 | train/loss |"
    assert table[2:] == ["| 0 | 10 | finished | 50 | 0 | 0.9 | 0.1 |", "| 1 | 100 | finished | 50 | 1 | 0.8 | 0.1 |",
                         "| 2 | 1000 | incomplete | 9 | — | — | — |"]
    assert (sweep_dir / "sweep_val_acc1.png").stat().st_size > 1000
    assert summary_main([str(tmp_path)]) == 2  # not a sweep directory
