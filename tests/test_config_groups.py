"""The typed hyper-parameter groups (model.optim, model.schedule, model.memory): one definition,
nested keys on the command line and in YAML, plain values in checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from deepres.errors import ConfigError
from deepres.training import Classifier, MemoryConfig, OptimizerConfig, ScheduleConfig, SequenceModule
from deepres.training.checkpoints import load_checkpoint, load_module
from deepres.training.cli import DeepresCLI, sections_with_class_path


class ParseOnlyCLI(DeepresCLI):
    def before_instantiate_classes(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass


def parsed_model(args: list[str]):
    """The module the command line describes, built the way LightningCLI builds it (classes from the
    parsed namespace)."""
    ParseOnlyCLI.user_class_paths = sections_with_class_path(args)
    cli = ParseOnlyCLI(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                       run=False, auto_configure_optimizers=False, args=args, parser_kwargs={"exit_on_error": False})
    return cli.parser.instantiate(cli.config).model


def test_nested_command_line_keys_reach_the_optimizer_and_schedule():
    model = parsed_model(["--model.optim.name", "adamw", "--model.optim.lr", "0.3", "--model.optim.betas",
                          "[0.8, 0.9]", "--model.schedule.name", "step", "--model.schedule.milestones", "[3]",
                          "--model.memory.activation_checkpointing", "2"])
    assert model.optim == OptimizerConfig(name="adamw", lr=0.3, betas=(0.8, 0.9))
    assert model.schedule.name == "step" and list(model.schedule.milestones) == [3]
    assert model.memory.activation_checkpointing == 2
    # untouched keys keep the group's defaults
    assert model.optim.weight_decay == 0.0 and model.schedule.gamma == 0.1


def test_a_partial_group_keeps_the_modules_own_defaults():
    """SequenceModule's optimizer default is Adam at 1e-3: setting only the lr keeps Adam."""
    model = parsed_model(["--model", "deepres.training.SequenceModule", "--data", "deepres.data.SequenceDataModule",
                          "--model.optim.lr", "0.01"])
    assert model.optim.name == "adam" and model.optim.lr == 0.01 and model.schedule.name == "constant"


def test_groups_drive_the_optimizer_and_the_lr_schedule():
    module = Classifier(depth=3, width=8, optim=OptimizerConfig(name="sgd", lr=0.2, momentum=0.5, nesterov=False),
                        schedule=ScheduleConfig(name="step", milestones=[2], gamma=0.5))
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            group = trainer.optimizers[0].param_groups[0]
            seen.append((type(trainer.optimizers[0]), group["momentum"], group["nesterov"], group["lr"]))

    data = TensorDataset(torch.randn(16, 64), torch.randint(0, 10, (16,)))
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, DataLoader(data, batch_size=4))
    assert {s[:3] for s in seen} == {(torch.optim.SGD, 0.5, False)}
    assert [s[3] for s in seen] == pytest.approx([0.2, 0.2, 0.1, 0.1])


def test_modules_take_keyword_arguments_only():
    with pytest.raises(TypeError):
        Classifier("highway_mlp", 3)  # noqa: the point is that positions are refused


def test_a_mapping_is_checked_key_by_key():
    assert Classifier(depth=2, width=4, optim={"lr": 0.01}).optim.lr == 0.01
    with pytest.raises(ConfigError, match=r"model\.optim: unknown key\(s\) learning_rate; model\.optim takes"):
        Classifier(depth=2, width=4, optim={"learning_rate": 0.01})


def test_checkpoint_hparams_are_plain_and_rebuild_the_module(tmp_path):
    """The groups are stored as dicts: the file loads weights-only, and load_from_checkpoint rebuilds them."""
    module = SequenceModule(hidden_size=4, input_shape=(5, 2), optim=OptimizerConfig(name="adamw", lr=0.02),
                            memory=MemoryConfig(activation_checkpointing=1))
    trainer = L.Trainer(accelerator="cpu", max_steps=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.strategy.connect(module)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    saved = load_checkpoint(path)["hyper_parameters"]
    assert saved["optim"] == {"name": "adamw", "lr": 0.02, "momentum": 0.9, "nesterov": True,
                              "betas": [0.9, 0.999], "weight_decay": 0.0}
    assert saved["memory"]["activation_checkpointing"] == 1
    loaded = load_module(SequenceModule, path)
    assert loaded.optim == module.optim and loaded.memory == module.memory and loaded.schedule == module.schedule
    for a, b in zip(loaded.state_dict().values(), module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_memory_auto_measures_the_module_at_its_data_shape_and_batch(monkeypatch):
    """model.memory.activation_checkpointing: auto reaches parallelize() with the budget, samples of the
    module's input shape and the data module's batch size; a roomy budget needs no checkpointing."""
    import deepres.training.module as module_file

    calls = []
    real = module_file.parallelize

    def recording(net, **kwargs):
        calls.append(kwargs)
        return real(net, **kwargs)

    monkeypatch.setattr(module_file, "parallelize", recording)
    module = Classifier(depth=4, width=8, memory=MemoryConfig(activation_checkpointing="auto", memory_budget_gb=64.0))

    class Data(L.LightningDataModule):
        batch_size = 4

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(8, 64), torch.randint(0, 10, (8,))), batch_size=4)

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=Data())
    (kwargs,) = calls
    assert kwargs["memory_budget_gb"] == 64.0 and kwargs["batch_size"] == 4
    assert tuple(kwargs["example_input"].shape[1:]) == (64,)
    assert module.net.blocks.checkpoint_every == 0  # 64 GB: storing every activation fits
