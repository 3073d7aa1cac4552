"""Configuration keys are matched exactly; a near miss on the command line or in a YAML file gets "did you mean"."""

from __future__ import annotations

import pytest

from deepres.training.cli import main
from deepres.training.key_suggestions import class_keys, close


def _error(capsys, *argv: str) -> str:
    assert main(["fit", *argv, "--print_config"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_a_prefix_of_an_option_is_refused_not_taken_for_the_option(capsys):
    err = _error(capsys, "--trainer.max_epoch", "3")
    assert "--trainer.max_epoch is not an option (did you mean --trainer.max_epochs?)" in err
    assert "matched exactly" in err


def test_a_misspelled_option_names_the_nearest_one(capsys):
    err = _error(capsys, "--trainer.max_epochs", "2", "--tranier.devices", "1")
    assert "--tranier.devices is not an option (did you mean --trainer.devices" in err
    assert "--trainer.max_epochs is not" not in err  # only the bad one is named


def test_the_full_option_still_parses(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--trainer.max_epochs", "3", "--print_config"])
    assert done.value.code == 0
    assert "max_epochs: 3" in capsys.readouterr().out


def test_a_misspelled_yaml_key_gets_did_you_mean_and_names_the_file(capsys, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("trainer:\n  max_epoch: 3\n")
    err = _error(capsys, "--config", str(config))
    assert f"trainer.max_epoch (in {config}) is not a key (did you mean trainer.max_epochs?)" in err


def test_a_misspelled_yaml_section_gets_did_you_mean(capsys, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("trainr:\n  max_epochs: 3\n")
    assert "trainr (in " in (err := _error(capsys, "--config", str(config))) and "(did you mean trainer?)" in err


def test_a_misspelled_model_option_gets_did_you_mean_in_yaml_and_on_the_command_line(capsys, tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("model:\n  init_args:\n    dpeth: 10\n")
    for argv in (["--config", str(config)], ["--model.dpeth", "10"]):
        err = _error(capsys, *argv)
        assert "has no option 'dpeth' (did you mean 'depth'" in err


def test_close_prefers_the_keys_an_abbreviation_abbreviates():
    assert close("run.nam", ["run.name", "run.root", "run"]) == ["run.name"]
    assert close("zzz", ["run.name"]) == []
    assert {"depth", "gate", "optim", "optim.lr", "schedule.name", "memory.compile"} <= class_keys("deepres.training.Classifier")


def test_a_key_that_moved_into_a_config_group_points_to_its_new_place(capsys):
    err = _error(capsys, "--model.lr", "0.1")
    assert "has no option 'lr' (did you mean 'optim.lr'?)" in err


@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_a_misspelled_key_inside_a_config_group_gets_did_you_mean(capsys, tmp_path, where):
    if where == "yaml":
        config = tmp_path / "job.yaml"
        config.write_text("model:\n  init_args:\n    optim:\n      lrr: 0.1\n")
        err = _error(capsys, "--config", str(config))
    else:
        err = _error(capsys, "--model.optim.lrr", "0.1")
    assert "has no option 'optim.lrr' (did you mean 'optim.lr'?)" in err
