"""Combinations of deepres's options, each checked by the run plan and trained for 2 steps, many in one process.

    python tests/_matrix.py ROWS.json OUT.json        # once per rank (tests/procs.run_ranks), or alone

ROWS.json is a list of rows, each a dict with one value per factor (see FACTORS); every row is first checked the
way `deepres fit` checks it before anything is written (the run plan, the net's construction, the strategy's
checks), then, unless refused, trained for 2 optimizer steps on tiny random data in this same process, one Trainer
after another (so a 2-process group serves every distributed row). Rank 0 writes OUT.json: per row, "refused" with
the one-line message, or "trained" with the losses, or "failed" with the error.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
import typing
from pathlib import Path
from typing import Any

import torch

from deepres.errors import ConfigError
from deepres.models.blocks import GATES
from deepres.models.init_presets import INITS, PLAIN_INITS, RESIDUAL_INITS
from deepres.training.plan import MemoryMode, build_plan

# The factors and their values, from deepres's own option lists where it keeps one.
BLOCKS = [("highway", "default"), ("gated", "default"), *[("residual", i) for i in RESIDUAL_INITS],
          *[("plain", i) for i in PLAIN_INITS if i == "orthogonal"]]
assert {g for g, _ in BLOCKS} == set(GATES) and {i for _, i in BLOCKS} | {"delta_orthogonal"} == set(INITS)
MEMORY = {"none": 0, "every": 2, "sqrt": "sqrt", "all": "all", "selective": "selective", "auto": "auto",
          "reversible": 0}
assert set(MEMORY) == set(typing.get_args(MemoryMode))
STRATEGIES = {"single": "auto", "ddp": "ddp", "zero1": "deepspeed_stage_1", "zero2": "deepspeed_stage_2",
              "zero3": "deepspeed_stage_3", "pipeline": "pipeline"}
FACTORS: dict[str, list[Any]] = {
    "strategy": list(STRATEGIES),
    "memory": list(MEMORY),
    "block": [f"{g}/{i}" for g, i in BLOCKS],
    "precision": ["32-true", "bf16-mixed"],
    "clip": [None, 1.0],
    "accumulate": [1, 2],
    "compile": [False, True],
    "ema": [None, 0.99],
    "drop_path": [0.0, 0.1],
    "channels_last": [False, True],
}
DEFAULTS = {name: values[0] for name, values in FACTORS.items()}
BATCH, FEATURES, CLASSES = 8, 12, 4


def processes(row: dict[str, Any]) -> int:
    return 1 if row["strategy"] == "single" else 2


def config(row: dict[str, Any]) -> dict[str, Any]:
    """The row as the parsed configuration `deepres fit` would hand the run plan."""
    gate, init = row["block"].split("/")
    setting = MEMORY[row["memory"]]
    memory = {"activation_checkpointing": setting, "compile": row["compile"], "channels_last": row["channels_last"],
              "memory_budget_gb": 1.0 if setting == "auto" else None}
    model = {"arch": "highway_mlp", "depth": 5, "width": 8, "gate": gate, "init": init,
             "drop_path": row["drop_path"], "reversible": row["memory"] == "reversible", "memory": memory,
             "ema_decay": row["ema"]}
    trainer = {"accelerator": "cpu", "devices": processes(row), "strategy": STRATEGIES[row["strategy"]],
               "precision": row["precision"], "gradient_clip_val": row["clip"],
               "accumulate_grad_batches": row["accumulate"], "max_steps": 2}
    return {"model": {"class_path": "deepres.training.Classifier", "init_args": model},
            "data": {"class_path": "FixedData", "init_args": {"batch_size": BATCH}},
            "trainer": trainer, "seed_everything": 0}


def build(row: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(the LightningModule, the Trainer's arguments with the strategy resolved), checked as `deepres fit` checks
    them before anything is written. Raises ConfigError for a refused row."""
    from deepres.strategies import resolve_strategy
    from deepres.training import Classifier, MemoryConfig

    cfg = config(row)
    build_plan(cfg)
    args = dict(cfg["model"]["init_args"])
    memory = MemoryConfig(**args.pop("memory"))
    torch.manual_seed(0)
    model = Classifier(**args, memory=memory, num_classes=CLASSES, input_shape=(FEATURES,))
    trainer = dict(cfg["trainer"])
    trainer["strategy"] = resolve_strategy(trainer, batch_size=BATCH, model=model)
    return model, trainer


def check(row: dict[str, Any]) -> str | None:
    """The refusal's message, or None when the row may run."""
    try:
        build(row)
    except ConfigError as err:
        return str(err).splitlines()[0]
    return None


def train(row: dict[str, Any]) -> dict[str, Any]:
    import lightning.pytorch as pl
    from _pipe import FixedData, Record

    try:
        model, trainer_args = build(row)
    except ConfigError as err:
        return {"outcome": "refused", "message": str(err).splitlines()[0]}
    record = Record()
    try:
        trainer = pl.Trainer(**trainer_args, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, use_distributed_sampler=False, num_sanity_val_steps=0,
                             limit_val_batches=0, callbacks=[record])
        trainer.fit(model, datamodule=FixedData(BATCH, (FEATURES,)))
    except ConfigError as err:  # refused only once the run started: the plan should have refused it
        return {"outcome": "failed", "message": f"refused after the start: {str(err).splitlines()[0]}"}
    except Exception as err:  # noqa: BLE001 - every failure is a finding, reported with its row
        return {"outcome": "failed", "message": f"{type(err).__name__}: {err}".splitlines()[0],
                "traceback": traceback.format_exc()[-3000:]}
    finite = bool(record.losses) and all(math.isfinite(v) for v in record.losses)
    return {"outcome": "trained" if finite and trainer.global_step == 2 else "failed",
            "losses": record.losses, "steps": trainer.global_step}


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    rows = json.loads(Path(argv[0]).read_text())
    results = []
    for row in rows:
        result = train(row)
        print(f"{row} -> {result['outcome']} {result.get('message', '')}", file=sys.stderr, flush=True)
        results.append({"row": row, **result})
        if result["outcome"] == "failed":
            # the ranks may no longer agree on where they are: stop here (the test reports this row)
            print(result.get("traceback", ""), file=sys.stderr, flush=True)
            break
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        Path(argv[1]).write_text(json.dumps(results, indent=1))
    return 1 if results and results[-1]["outcome"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
