"""Every shell command and YAML block of README.md and docs/*.md runs (tests/_examples.py says how: smoke mode
for training, `--print_config` / `--dry-run` / `bash -n` for blocks marked as needing a GPU, a cluster, data,
several processes, the network or minutes).

The blocks all run once, in one process that imports deepres, torch and Lightning a single time and forks
for each command; the tests below read its results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _examples  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALL_BLOCKS = [block for page in _examples.pages() for block in _examples.blocks(page)]


def run_examples(out: Path, *pages: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    subprocess.run([sys.executable, str(ROOT / "tests" / "_examples.py"), str(out), *map(str, pages)], env=env,
                   check=True, timeout=1200)
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("examples") / "results.jsonl"
    found = {r["id"]: r for r in run_examples(out)}
    executed = sum("smoke" in r["how"] or "run" in r["how"] for r in found.values())
    print(f"\nexamples: {len(found)} blocks; {sum(r['lang'] == 'yaml' for r in found.values())} YAML; "
          f"{executed} with commands run, {sum('smoke' in r['how'] for r in found.values())} in smoke mode; "
          f"{sum(r['mark'] is not None for r in found.values())} marked "
          f"({', '.join(sorted({r['mark'] for r in found.values() if r['mark']}))}); "
          f"{sum(r['seconds'] for r in found.values()):.0f} s")
    return found | {"_sandbox": {"path": str(out.parent / "examples")}}


@pytest.mark.slow
@pytest.mark.parametrize("block", ALL_BLOCKS, ids=lambda b: b.id)
def test_example_runs(results, block):
    result = results[block.id]
    assert result["ok"], f"{block.id} ({block.mark or 'runs'}):\n{result['error']}"


@pytest.mark.slow
def test_every_block_is_checked_and_most_run(results):
    blocks = [r for key, r in results.items() if not key.startswith("_")]
    assert len(blocks) == len(ALL_BLOCKS) >= 40
    assert all(r["how"] for r in blocks), [r["id"] for r in blocks if not r["how"]]
    smoke = [r for r in blocks if "smoke" in r["how"]]
    assert len(smoke) >= 10  # the tour, training, configuration, memory, dashboards pages train for real


@pytest.mark.slow
def test_auto_checkpointing_names_its_choice_and_predicted_peak_in_the_plan(results):
    """docs/memory.md: `auto` records the choice and the predicted peak in plan.json."""
    plan = json.loads((Path(results["_sandbox"]["path"]) / "memory" / "runs" / "auto" / "plan.json").read_text())
    memory = json.dumps(plan)
    assert '"chosen": "' in memory and '"predicted_peak_gb": ' in memory, memory[:2000]


def test_commands_are_split_as_a_shell_would():
    script = ("deepres fit --print_config > my.yaml   # the config\n"
              "deepres submit --nodes 2 \\\n    --name x -- --trainer.max_steps 7\n"
              "scripts/install.sh && .venv/bin/deepres fit\n")
    assert _examples.commands(script) == [
        (["deepres", "fit", "--print_config"], "my.yaml"),
        (["deepres", "submit", "--nodes", "2", "--name", "x", "--", "--trainer.max_steps", "7"], None),
        (["scripts/install.sh"], None),
        ([".venv/bin/deepres", "fit"], None),
    ]


def test_a_mark_must_be_one_of_the_documented_kinds(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- example: gpu -->\n```bash\ndeepres fit\n```\n\n<!-- example: someday -->\n```bash\nls\n```\n")
    with pytest.raises(ValueError, match="unknown example mark 'someday'"):
        _examples.blocks(page)


@pytest.mark.slow
def test_a_broken_example_is_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```bash\ndeepres fit --model.dpeth 3\n```\n\n<!-- example: gpu -->\n```bash\n"
                    "deepres fit --trainer.accelerator gpu --trainer.devices 8\n```\n")
    first, second = run_examples(tmp_path / "out.jsonl", page)
    assert not first["ok"] and "dpeth" in first["error"] and first["how"] == ["smoke"]
    assert second["how"] == ["print_config"]
