"""What a user on a CPU machine sees first: `deepres fit --help` leading with deepres's own options, and GPU configs
checked (`--print_config`) as the CUDA configs they are."""

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


def test_a_gpu_config_is_checked_as_a_cuda_one_on_a_machine_without_gpus(monkeypatch) -> None:
    """`--print_config` of a GPU config on a CPU machine checks it as the CUDA config it is (not as Apple MPS)."""
    import torch

    from deepres.strategies.settings import accelerator_name

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert accelerator_name({"accelerator": "gpu"}) == "cuda"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert accelerator_name({"accelerator": "gpu"}) == "mps"
