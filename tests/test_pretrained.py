"""torchvision and timm ResNet weights load into deepres's ResNets by name (random weights: nothing downloaded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from deepres.errors import ConfigError
from deepres.models import (
    create_model,
    export_torchvision_weights,
    load_timm_weights,
    load_torchvision_weights,
    load_weights_file,
)

REPO = Path(__file__).resolve().parents[1]


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode with BatchNorm statistics and affine terms away from their defaults (so BN is not a no-op)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet101"])
def test_torchvision_weights_give_the_same_outputs(name: str) -> None:
    torch.manual_seed(0)
    theirs = _randomised(getattr(torchvision.models, name)())
    ours = create_model(name).eval()
    report = load_torchvision_weights(ours, theirs.state_dict())
    assert report.left_at_init == [] and len(report.loaded) == len(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    # and back: the exported dict loads strictly into torchvision's model
    back = getattr(torchvision.models, name)().eval()
    back.load_state_dict(export_torchvision_weights(ours), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(back(x), theirs(x), atol=1e-6, rtol=0)


def test_highway_resnet50_loads_torchvision_weights_and_keeps_its_gates_at_init() -> None:
    theirs = torchvision.models.resnet50().state_dict()
    model = create_model("resnet50", gate="highway")
    gates_before = {k: v.clone() for k, v in model.state_dict().items() if "transform_gate" in k}
    report = load_torchvision_weights(model, theirs)
    assert sorted(report.left_at_init) == sorted(gates_before) and len(gates_before) == 2 * 16
    after = model.state_dict()
    for key, value in gates_before.items():
        assert torch.equal(after[key], value)
    for block in model.blocks:  # the transform gates start at their configured bias
        gate = block.transform_gate
        assert torch.all(gate.proj.bias == gate.initial_bias)
    assert torch.equal(after["blocks.3.body.conv2.weight"], theirs["layer2.0.conv2.weight"])
    assert torch.equal(after["blocks.3.shortcut.1.running_var"], theirs["layer2.0.downsample.1.running_var"])
    assert "32 transform_gate tensors" in str(report)
    with pytest.raises(ConfigError, match="only gate='residual' models export"):
        export_torchvision_weights(model)


def test_wrong_architecture_and_head_are_named() -> None:
    with pytest.raises(ConfigError, match="another architecture"):
        load_torchvision_weights(create_model("resnet34"), torchvision.models.resnet50().state_dict())
    model = create_model("resnet18", num_classes=10)
    with pytest.raises(ConfigError, match=r"fc.weight has shape \(1000, 512\).*head='skip'"):
        load_torchvision_weights(model, torchvision.models.resnet18().state_dict())
    head_before = model.head[-1].weight.clone()
    report = load_torchvision_weights(model, torchvision.models.resnet18().state_dict(), head="auto")
    assert sorted(report.left_at_init) == ["head.2.bias", "head.2.weight"]
    assert torch.equal(model.head[-1].weight, head_before) and "1000 classes" in report.note
    with pytest.raises(ConfigError, match="only post-activation ImageNet ResNets"):
        load_torchvision_weights(create_model("highway_mlp"), {})
    with pytest.raises(ConfigError, match="only post-activation ImageNet ResNets"):
        load_torchvision_weights(create_model("preact_resnet164_cifar"), {})


def test_timm_resnet_weights_load_by_name() -> None:
    timm = pytest.importorskip("timm")
    theirs = _randomised(timm.create_model("resnet50", pretrained=False))
    ours = create_model("resnet50").eval()
    load_timm_weights(ours, theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    # resnet50d has a deep stem and average-pool shortcuts: not this architecture
    with pytest.raises(ConfigError, match="no place for, e.g. conv1.0.weight"):
        load_timm_weights(create_model("resnet50"), timm.create_model("resnet50d", pretrained=False).state_dict())


def test_init_from_a_file_in_the_classifier(tmp_path: Path) -> None:
    from deepres.training import Classifier

    theirs = torchvision.models.resnet18().state_dict()
    torch.save(theirs, tmp_path / "resnet18.pth")
    module = Classifier(arch="resnet18", gate="highway", num_classes=10, input_shape=(3, 32, 32),
                        init_from=str(tmp_path / "resnet18.pth"))
    assert torch.equal(module.net.stem[0].weight, theirs["conv1.weight"])
    assert not torch.equal(module.net.head[-1].weight[:10], theirs["fc.weight"][:10].reshape(10, -1))
    # a deepres checkpoint of the same architecture loads with its own names
    torch.save({"state_dict": {f"net.{k}": v for k, v in module.net.state_dict().items()}}, tmp_path / "last.ckpt")
    again = create_model("resnet18", gate="highway", num_classes=10)
    report = load_weights_file(again, str(tmp_path / "last.ckpt"))
    assert report.left_at_init == [] and torch.equal(again.head[-1].weight, module.net.head[-1].weight)
    with pytest.raises(ConfigError, match="no such file"):
        load_weights_file(again, str(tmp_path / "missing.pth"))


def test_init_from_is_a_cli_option(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "deepres", "fit", "--model.arch", "resnet18",
                          "--model.init_from", str(tmp_path / "w.pth"), "--print_config"],
                         capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"init_from: {tmp_path / 'w.pth'}" in out.stdout


@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_a_gated_resnet_starts_as_exactly_the_resnet_its_weights_came_from(source: str) -> None:
    """gate=gated with both gates open is the ResNet: loading opens them exactly (output difference 0), and the
    gates still get gradients (they can learn); a Highway net cannot be the ResNet and says nothing of the kind."""
    torch.manual_seed(0)
    if source == "timm":
        timm = pytest.importorskip("timm")
        theirs = _randomised(timm.create_model("resnet18", pretrained=False))
        load = load_timm_weights
    else:
        theirs = _randomised(torchvision.models.resnet18())
        load = load_torchvision_weights
    ours = create_model("resnet18", gate="gated").eval()
    report = load(ours, theirs.state_dict())
    assert "8 gated blocks opened: starts as exactly the ResNet" in str(report)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), create_and_load_plain(theirs, load)(x))
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5
    ours.train()
    ours(x).sum().backward()
    assert all(b.carry_gate.proj.weight.grad is not None for b in ours.blocks)
    highway = create_model("resnet18", gate="highway").eval()
    assert "opened" not in str(load(highway, theirs.state_dict()))


def create_and_load_plain(theirs: torch.nn.Module, load) -> torch.nn.Module:
    plain = create_model("resnet18").eval()
    load(plain, theirs.state_dict())
    return plain
