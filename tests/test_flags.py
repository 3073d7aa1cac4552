"""Every training option quoted anywhere exists: in deepres's messages and docstrings (string literals of
deepres/ and scripts/), in the comments of configs/, in README.md and docs/.

Quoted means `--section.key` or a bare `section.key` for the sections of `deepres fit` (model, data, trainer,
run, wandb, diagnostics), the undotted options of a quoted `deepres fit|validate|test` command (`--config`,
`--ckpt_path`, ...), and a YAML mapping quoted inline as `key {sub: value}`. Each is checked against the
parser `deepres fit` builds (jsonargparse) and the init arguments of deepres's model and data classes.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import lightning as L
import pytest

from deepres.training.cli import DeepresCLI
from deepres.training.key_suggestions import class_keys, parser_keys

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("model", "data", "trainer", "run", "wandb", "diagnostics")
MODEL_CLASSES = ("deepres.training.Classifier", "deepres.training.SequenceModule")
DATA_CLASSES = tuple(f"deepres.data.{name}" for name in (
    "DigitsDataModule", "SequenceDataModule", "SyntheticDataModule", "CIFARDataModule", "ShardDataModule"))
# `section.key` that is no option by design: what each one is instead
NOT_OPTIONS = {
    "model.blocks": "the attribute of a built model that holds its repeated blocks",
    "model.net": "the attribute of a deepres LightningModule that holds its net",
    "data.input_shape": "the attribute of a data module that the CLI links into the model",
    "data.base": "the module deepres.data.base",
    "wandb.init": "wandb's function",
    "trainer.save_checkpoint": "Lightning's Trainer method",
    "trainer.checkpoint_callback": "Lightning's Trainer attribute",
    "trainer.max_epoch": "the misspelling that the did-you-mean examples show",
}
# options of the `fit` subcommand itself, beside the sections (LightningCLI adds them per subcommand)
SUBCOMMAND_OPTIONS = {"ckpt_path"}
FILE_SUFFIXES = (".md", ".pkl", ".ckpt", ".yaml", ".json", ".py", ".csv", ".png", ".pt", ".pth")
DOTTED = re.compile(r"(?<![\w./\-])(--)?((?:" + "|".join(SECTIONS) + r")\.[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)")
FIT_COMMAND = re.compile(r"deepres (?:fit|validate|test)\b([^\n`\"'|)]*)")
INLINE_MAPPING = re.compile(r"\b([a-z_]+) \{([a-z_]+): ")


class ParseOnlyCLI(DeepresCLI):
    user_class_paths: set[str] = set()  # the default model and data classes

    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


# dict-typed options whose keys the data or model class checks itself
FREE_FORM = ("data.task_args", "model.arch_args")


@cache
def valid_keys() -> frozenset[str]:
    cli = ParseOnlyCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=[], parser_kwargs={"exit_on_error": False})
    keys = set(parser_keys(cli.parser)) | SUBCOMMAND_OPTIONS
    for section, classes in (("model", MODEL_CLASSES), ("data", DATA_CLASSES)):
        for class_path in classes:
            keys |= {f"{section}.{k}" for k in class_keys(class_path)}
    return frozenset(keys)


def problem(key: str, keys: frozenset[str]) -> str | None:
    """Why a quoted key is not an option (None when it is one)."""
    key = key.rstrip(".").replace(".init_args.", ".").removesuffix(".init_args").removesuffix(".class_path")
    if key in keys or any(key == k or key.startswith(k + ".") for k in NOT_OPTIONS):
        return None
    if key.startswith("model.arch_args.") and f"model.{key.split('.')[2]}" in keys:
        return f"an option of its own: --model.{key.split('.')[2]}"
    if any(k.startswith(key + ".") for k in keys):
        return None  # a group (model.optim, model.memory)
    if key.startswith("trainer.strategy.") or key.startswith("trainer.callbacks."):
        return None  # the arguments of a strategy or callback class
    if any(key.startswith(f"{k}.") for k in FREE_FORM):
        return None  # the keys of a free-form dict option, checked by the class that reads it
    return "not an option of deepres fit"


def quoted_keys(text: str) -> list[str]:
    found = [m.group(2) for m in DOTTED.finditer(text)
             if not m.group(2).endswith(FILE_SUFFIXES) and m.group(2) == m.group(2).lower()]  # no files, no KEY
    for command in FIT_COMMAND.finditer(text):
        found += [flag[2:] for flag in re.findall(r"(?<!\S)--[A-Za-z_][\w.]*", command.group(1)) if "." not in flag]
    found += [f"model.{outer}.{inner}" for outer, inner in INLINE_MAPPING.findall(text)]
    return found


def python_strings(path: Path) -> list[tuple[int, str]]:
    strings = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.append((node.lineno, node.value))
    return strings


def sources() -> list[tuple[str, str]]:
    """(where, text) for every place that quotes options."""
    out = []
    for path in [*(ROOT / "deepres").rglob("*.py"), *(ROOT / "scripts").rglob("*.py")]:
        out += [(f"{path.relative_to(ROOT)}:{line}", text) for line, text in python_strings(path)]
    for path in [ROOT / "README.md", *(ROOT / "docs").rglob("*.md")]:
        out += [(f"{path.relative_to(ROOT)}:{i}", line) for i, line in enumerate(path.read_text().splitlines(), 1)]
    for path in (ROOT / "configs").glob("*.yaml"):
        out += [(f"{path.relative_to(ROOT)}:{i}", line) for i, line in enumerate(path.read_text().splitlines(), 1)
                if line.lstrip().startswith("#")]
    return out


def undotted_top_level(key: str, keys: frozenset[str]) -> str | None:
    return None if key in keys else "not an option of deepres fit"


def test_every_quoted_option_exists():
    keys = valid_keys()
    checked, bad = 0, []
    for where, text in sources():
        for key in quoted_keys(text):
            checked += 1
            why = problem(key, keys) if "." in key else undotted_top_level(key, keys)
            if why:
                bad.append(f"{where}: {key}: {why}")
    assert checked > 300  # the docs and messages do quote options; a broken pattern would find none
    assert not bad, "options quoted that deepres fit does not have:\n" + "\n".join(sorted(set(bad)))


@pytest.mark.parametrize("stale, why", [
    ("deepres fit --name my-run --ckpt_path last", "name"),
    ("Fix: reversible blocks (arch_args {reversible: true})", "arch_args"),
    ("use activation checkpointing (model.activation_checkpointing).", "activation_checkpointing"),
])
def test_the_check_refuses_options_that_moved(stale, why):
    """The three quotes of options that had moved (to --run.name, --model.reversible and
    model.memory.activation_checkpointing) are each found and refused."""
    keys = valid_keys()
    found = quoted_keys(stale)
    problems = [problem(k, keys) if "." in k else undotted_top_level(k, keys) for k in found]
    assert any(why in k and p for k, p in zip(found, problems, strict=True)), (found, problems)


def test_the_options_they_moved_to_exist():
    keys = valid_keys()
    for key in ("run.name", "model.reversible", "model.memory.activation_checkpointing", "ckpt_path", "config",
                "trainer.max_epochs", "model.optim.lr", "data.batch_size", "diagnostics.every_n_steps"):
        assert problem(key, keys) is None if "." in key else key in keys, key
