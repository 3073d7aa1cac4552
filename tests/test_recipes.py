"""Recipe pieces: RandAugment/TrivialAugment, MixUp/CutMix on the device with soft targets, EMA of the weights."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import lightning as L
import procs
import pytest
import torch
from torchvision.transforms import v2

from deepres.data.recipes import BatchMix, auto_augment
from deepres.data.synthetic import SyntheticDataModule
from deepres.errors import ConfigError
from deepres.training import Classifier, OptimizerConfig, ScheduleConfig

REPO = Path(__file__).resolve().parents[1]


def _distinct_neighbours(n: int, k: int) -> torch.Tensor:
    return torch.arange(n) % k  # y_i != y_{i-1} for k >= 2: each mixed sample has two classes


def test_mixup_targets_sum_to_one_and_follow_the_sampled_lambda() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 6, 6), _distinct_neighbours(8, 5)
    images, targets = BatchMix(5, mixup_alpha=0.4)(x.clone(), y)
    assert targets.shape == (8, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    lam = targets[0, y[0]].item()
    assert 0 < lam < 1
    prev = y.roll(1)
    torch.testing.assert_close(targets[torch.arange(8), y], torch.full((8,), lam))
    torch.testing.assert_close(targets[torch.arange(8), prev], torch.full((8,), 1 - lam))
    # the images are mixed with the same lambda as the labels (partner: the previous sample)
    torch.testing.assert_close(images, lam * x + (1 - lam) * x.roll(1, 0))


def test_cutmix_targets_are_the_pasted_area() -> None:
    torch.manual_seed(1)
    x = torch.arange(1, 9, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 3, 16, 16).clone()  # image i == i + 1
    y = _distinct_neighbours(8, 3)
    images, targets = BatchMix(3, cutmix_alpha=1.0)(x.clone(), y)
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    for i in range(8):
        from_partner = (images[i] == x[i - 1]).float().mean().item()
        assert (images[i] == x[i]).logical_or(images[i] == x[i - 1]).all()
        assert targets[i, y[i]].item() == pytest.approx(1 - from_partner)
        assert targets[i, y[i - 1]].item() == pytest.approx(from_partner)


def test_both_on_gives_one_of_them_per_batch_and_bad_alphas_are_refused() -> None:
    mix = BatchMix(4, mixup_alpha=0.2, cutmix_alpha=1.0)
    assert isinstance(mix.mix, v2.RandomChoice)
    with pytest.raises(ConfigError, match="mixup_alpha=-1"):
        BatchMix(4, mixup_alpha=-1)
    assert not BatchMix(4).enabled


def test_policies_by_name() -> None:
    ra = auto_augment("randaugment", 3, 7)
    assert isinstance(ra, v2.RandAugment) and (ra.num_ops, ra.magnitude) == (3, 7)
    assert isinstance(auto_augment("trivialaugment"), v2.TrivialAugmentWide)
    assert auto_augment("none") is None
    with pytest.raises(ConfigError, match="randaugment or trivialaugment"):
        auto_augment("autoaugment")


def test_shard_transform_applies_the_policy_in_training_only() -> None:
    import io

    import numpy as np
    from PIL import Image

    from deepres.data.shards import ImageTransform

    calls = []

    def policy(img):
        calls.append(img.size)
        return img

    out = io.BytesIO()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(out, "JPEG")
    ImageTransform(True, 16, 18, "imagenet", policy)(out.getvalue())
    ImageTransform(False, 16, 18, "imagenet", policy)(out.getvalue())
    assert calls == [(16, 16)]  # after the crop, once, for the training transform


class _Mixing(SyntheticDataModule):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.batch_mix = BatchMix(self.num_classes, mixup_alpha=0.5)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return self.mix_batch(*batch)


class _Recorder(L.Callback):
    """The weights after every optimizer step, and what validation ran with."""

    def __init__(self) -> None:
        self.after_step: list[torch.Tensor] = []
        self.validated_with: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after_step.append(torch.nn.utils.parameters_to_vector(pl_module.net.parameters()).detach().clone())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.targets.append(batch[1])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.validated_with.append(torch.nn.utils.parameters_to_vector(pl_module.net.parameters()).detach().clone())


def _fit(tmp_path: Path, steps: int, ckpt: str | None = None, decay: float = 0.8) -> tuple[Classifier, _Recorder, L.Trainer]:
    torch.manual_seed(0)
    dm = _Mixing(image_size=4, channels=1, num_classes=3, train_size=32, val_size=8, batch_size=8)
    model = Classifier(arch="highway_mlp", depth=2, width=8, num_classes=3, input_shape=(1, 4, 4),
                       optim=OptimizerConfig(lr=0.2), schedule=ScheduleConfig(name="constant"), ema_decay=decay)
    recorder = _Recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[recorder],
                        val_check_interval=steps, check_val_every_n_epoch=None, num_sanity_val_steps=0, use_distributed_sampler=False,
                        enable_checkpointing=False)
    trainer.fit(model, dm, ckpt_path=ckpt)
    return model, recorder, trainer


def test_ema_weights_equal_the_closed_form_are_validated_and_checkpointed(tmp_path: Path) -> None:
    d, k = 0.8, 4
    model, rec, trainer = _fit(tmp_path, k, decay=d)
    theta = rec.after_step
    assert len(theta) == k
    # first update copies the weights; then ema <- d * ema + (1 - d) * theta_i
    closed = d ** (k - 1) * theta[0] + sum((1 - d) * d ** (k - 1 - i) * theta[i] for i in range(1, k))
    names = [n for n, _ in model.net.named_parameters()]
    shadow = model.ema.averaged_state_dict()
    ema_vector = torch.nn.utils.parameters_to_vector([shadow[n] for n in names])
    torch.testing.assert_close(ema_vector, closed)
    assert not torch.allclose(closed, theta[-1])
    # validation ran on the average; training resumes with the trained weights
    torch.testing.assert_close(rec.validated_with[0], closed)
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector(model.net.parameters()), theta[-1])
    # MixUp was on in training: the targets were class probabilities
    assert rec.targets[0].shape == (8, 3) and torch.allclose(rec.targets[0].sum(1), torch.ones(8))
    # checkpointed with the run: a plain state dict and the callback's state for resuming
    trainer.save_checkpoint(tmp_path / "ema.ckpt")
    ckpt = torch.load(tmp_path / "ema.ckpt", weights_only=False)
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector([ckpt["ema_state_dict"][n] for n in names]), closed)
    assert any(key.startswith("WeightEMA") for key in ckpt["callbacks"])


def test_ema_continues_after_resume(tmp_path: Path) -> None:
    d = 0.8
    _, rec_a, trainer = _fit(tmp_path, 3, decay=d)
    trainer.save_checkpoint(tmp_path / "three.ckpt")
    model, rec_b, _ = _fit(tmp_path, 5, ckpt=str(tmp_path / "three.ckpt"), decay=d)
    theta = rec_a.after_step + rec_b.after_step
    assert len(theta) == 5
    closed = d ** 4 * theta[0] + sum((1 - d) * d ** (4 - i) * theta[i] for i in range(1, 5))
    names = [n for n, _ in model.net.named_parameters()]
    shadow = model.ema.averaged_state_dict()
    torch.testing.assert_close(torch.nn.utils.parameters_to_vector([shadow[n] for n in names]), closed)


def test_ema_decay_is_checked() -> None:
    with pytest.raises(ConfigError, match="ema_decay=1.5"):
        Classifier(arch="highway_mlp", depth=2, width=8, num_classes=3, input_shape=(4,), ema_decay=1.5)


DDP_EMA = """
import json, sys
import lightning as L
import torch
from deepres.data.synthetic import SyntheticDataModule
from deepres.training import Classifier, OptimizerConfig, ScheduleConfig

if __name__ == "__main__":
    out = sys.argv[1]
    torch.manual_seed(0)
    dm = SyntheticDataModule(image_size=4, channels=1, num_classes=3, train_size=64, val_size=16, batch_size=8)
    model = Classifier(arch="highway_mlp", depth=2, width=8, num_classes=3, input_shape=(1, 4, 4),
                       optim=OptimizerConfig(lr=0.2), schedule=ScheduleConfig(name="constant"), ema_decay=0.7)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
                        num_sanity_val_steps=0, use_distributed_sampler=False, enable_checkpointing=False)
    trainer.fit(model, dm)
    trainer.save_checkpoint(f"{out}/ddp.ckpt")
    shadow = model.ema.averaged_state_dict()
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({k: v.flatten().tolist() for k, v in shadow.items()}, f)
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_ema_under_ddp_is_the_same_on_both_ranks_and_saved(tmp_path: Path) -> None:
    script = tmp_path / "ddp_ema.py"
    script.write_text(textwrap.dedent(DDP_EMA))
    env = {k: v for k, v in os.environ.items()
           if k not in ("LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")  # no rank variables: Lightning launches rank 1
    proc = procs.run([sys.executable, str(script), str(tmp_path)], 240, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for key in ranks[0]:
        assert ranks[0][key] == pytest.approx(ranks[1][key], abs=1e-6)
    saved = torch.load(tmp_path / "ddp.ckpt", weights_only=False)["ema_state_dict"]
    for key, value in ranks[0].items():
        assert saved[key].flatten().tolist() == pytest.approx(value, abs=1e-6)
