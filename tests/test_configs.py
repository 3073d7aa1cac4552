"""Every YAML in configs/ parses against the real signatures and builds its model (on the meta device)."""

import pathlib

import lightning as L
import pytest
import torch

from deepres.training.cli import DeepresCLI

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "configs").glob("*.yaml"))


class ParseOnlyCLI(DeepresCLI):
    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parse(config: pathlib.Path) -> dict:
    cli = ParseOnlyCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, args=["--config", str(config)], parser_kwargs={"exit_on_error": False})
    return cli.config


def test_there_are_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_builds_its_model(config):
    cfg = parse(config)
    model_cfg = cfg.model
    cls = {"deepres.training.Classifier": "Classifier", "deepres.training.SequenceModule": "SequenceModule"}[
        model_cfg.class_path]
    import deepres.training as training

    data_cls = cfg.data.class_path
    assert data_cls.startswith("deepres.data.")
    init_args = model_cfg.init_args.as_dict()
    # what the data module would link in
    if "Sequence" in data_cls:
        init_args.update(num_classes=0 if cfg.data.init_args.task == "adding" else 4,
                         input_shape=(cfg.data.init_args.seq_len, 2 if cfg.data.init_args.task == "adding" else 8))
    elif "Digits" in data_cls:
        init_args.update(num_classes=10, input_shape=(64,) if cfg.data.init_args.layout == "flat" else (1, 8, 8))
    elif "CIFAR" in data_cls:
        init_args.update(num_classes=100 if cfg.data.init_args.dataset == "cifar100" else 10, input_shape=(3, 32, 32))
    else:
        init_args.update(num_classes=1000, input_shape=(3, 224, 224))
    with torch.device("meta"):
        module = getattr(training, cls)(**init_args)
    assert sum(p.numel() for p in module.parameters()) > 0
    assert len(module.net.blocks) >= 1


def test_default_yaml_is_the_builtin_default():
    """configs/default.yaml spells out `deepres fit` with no arguments."""
    builtin = ParseOnlyCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True,
                           subclass_mode_data=True, run=False, args=[]).config
    written = parse(CONFIGS[0].parent / "default.yaml")
    for section in ("model", "data"):
        assert builtin[section].class_path == written[section].class_path
    assert builtin.trainer.max_epochs == written.trainer.max_epochs
    with torch.device("meta"):
        from deepres.training import Classifier

        io = {"num_classes": 10, "input_shape": (64,)}
        a = Classifier(**{**builtin.model.init_args.as_dict(), **io})
        b = Classifier(**{**written.model.init_args.as_dict(), **io})
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]
