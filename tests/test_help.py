"""`deepres fit --help` leads with deepres's own options, and names the default model's options."""

from __future__ import annotations

import pytest

from deepres.cli import main


def test_fit_help_lists_deepres_sections_before_the_trainer(capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: deepres fit|validate|test [--config FILE | NAME]")
    first = {name: text.index(marker) for name, marker in [
        ("model", "--model.help"), ("data", "--data.help"), ("run", "--run.name"), ("wandb", "--wandb.project"),
        ("diagnostics", "--diagnostics.every_n_steps"), ("trainer", "--trainer.max_epochs")]}
    assert max(v for k, v in first.items() if k != "trainer") < first["trainer"], first
    model_section = text[first["model"] - 600:first["data"]]
    for option in ("--model.depth", "--model.gate", "--model.drop_path", "--model.reversible"):
        assert option in model_section
