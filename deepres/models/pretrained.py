"""Weights in and out by name: torchvision and timm ResNet state dicts <-> deepres's ImageNet ResNets.

    import torchvision
    from deepres.models import create_model, load_torchvision_weights
    model = create_model("resnet50", gate="highway")            # Highway-ResNet-50
    report = load_torchvision_weights(model, torchvision.models.resnet50(weights="DEFAULT").state_dict())
    print(report)   # 320 tensors loaded; left at init: 16 transform gates (blocks.*.transform_gate.*)

deepres's ImageNet ResNets have torchvision's architecture (`gate="residual"`: the same tensors and
parameter count) under other names: `stem.0` is `conv1`, block 7 of the flat `blocks` is
`layer2.3`, `blocks.3.shortcut.0` is `layer2.0.downsample.0`, the head's Linear is `fc`. The map below
is built from the model's own structure (a stage starts where the block width changes), so any depth
with torchvision's stage layout maps. timm's ResNets (`resnet50.a1_in1k`, `resnet18.tv_in1k`, ...) use
the same names as torchvision for the standard stem and shortcuts; variants with another stem or
shortcut (`resnet50d`) do not fit these shapes and are refused with the offending tensor named.

Loading is strict: every tensor of the checkpoint must land on a tensor of the same shape. What the
checkpoint has no counterpart for (the gates of a Highway or gated ResNet) stays at its
initialisation, which for gates is the bias that makes the block start near the identity or
near a plain residual block (Srivastava et al. 2015; see deepres.models.blocks): starting from
ImageNet weights then begins from (almost) the ResNet the weights came from.

Single-device code only, like the rest of deepres.models.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from deepres.errors import ConfigError
from deepres.models.blocks import ResidualBlock
from deepres.models.bodies import BasicBody, BottleneckBody
from deepres.models.contract import blocks_of

HeadMode = str  # "load" (strict), "skip" (leave at init), "auto" (skip only when the class count differs)


@dataclass
class LoadReport:
    """What a load did: tensors loaded, tensors of the model left at init, and why the head was skipped."""

    loaded: list[str] = field(default_factory=list)
    left_at_init: list[str] = field(default_factory=list)
    note: str = ""

    def __str__(self) -> str:
        kinds: dict[str, int] = {}
        for key in self.left_at_init:
            kind = next((k for k in ("transform_gate", "carry_gate", "head") if k in key), key.rsplit(".", 1)[0])
            kinds[kind] = kinds.get(kind, 0) + 1
        init = ", ".join(f"{n} {k} tensors" for k, n in kinds.items()) or "nothing"
        return f"{len(self.loaded)} tensors loaded; left at init: {init}" + (f" ({self.note})" if self.note else "")


def _blocks_by_stage(model: nn.Module) -> list[tuple[int, int, ResidualBlock]]:
    """(stage, index in stage, block) for every block; a stage starts where the output width changes."""
    if not isinstance(blocks_of(model), nn.ModuleList) or not hasattr(model, "stem"):
        raise ConfigError(f"{type(model).__name__} is not a deepres ResNet (stem, blocks, head): torchvision "
                          "and timm ResNet weights load into deepres's ImageNet ResNets (resnet18 ... resnet200).")
    out, stage, j, width = [], 0, 0, None
    for block in model.blocks:
        if not isinstance(block, ResidualBlock) or not isinstance(block.body, (BasicBody, BottleneckBody)):
            raise ConfigError("only post-activation ImageNet ResNets (body basic or bottleneck) have the layout of "
                              f"torchvision's and timm's ResNets; this model has a {type(block.body).__name__} body.")
        last_bn = block.body.bn3 if isinstance(block.body, BottleneckBody) else block.body.bn2
        if width is not None and last_bn.num_features != width:
            stage, j = stage + 1, 0
        out.append((stage, j, block))
        width, j = last_bn.num_features, j + 1
    if stage != 3:
        raise ConfigError(f"torchvision's ResNets have 4 stages; this model has {stage + 1}.")
    return out


def _head_linear(model: nn.Module) -> str:
    linears = [name for name, m in model.head.named_modules() if isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise ConfigError("the model's head has no single Linear layer to map onto torchvision's `fc`.")
    return f"head.{linears[0]}"


def torchvision_names(model: nn.Module) -> dict[str, str]:
    """deepres state-dict key -> torchvision (and timm) key, for every tensor that has a counterpart."""
    prefixes = {"stem.0.": "conv1.", "stem.1.": "bn1.", _head_linear(model) + ".": "fc."}
    for i, (stage, j, block) in enumerate(_blocks_by_stage(model)):
        theirs = f"layer{stage + 1}.{j}."
        prefixes[f"blocks.{i}.body."] = theirs
        if block.shortcut is not None:
            if not (isinstance(block.shortcut, nn.Sequential) and len(block.shortcut) == 2):
                raise ConfigError(f"block {i}'s shortcut is not a 1x1 conv + BatchNorm as in torchvision.")
            prefixes[f"blocks.{i}.shortcut."] = theirs + "downsample."
    names = {}
    for key in model.state_dict():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is not None:
            names[key] = prefixes[prefix] + key[len(prefix):]
    return names


def _load(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str, head: HeadMode) -> LoadReport:
    if head not in ("load", "skip", "auto"):
        raise ConfigError(f"head={head!r}: choose load, skip or auto.")
    names = torchvision_names(model)
    ours = model.state_dict()
    theirs_to_ours = {v: k for k, v in names.items()}
    unknown = [k for k in state_dict if k not in theirs_to_ours]
    if unknown:
        raise ConfigError(f"the {source} state dict has {len(unknown)} tensors this model has no place for, e.g. "
                          f"{', '.join(unknown[:3])}: it is another architecture (check depth, body and stem).")
    missing = [v for k, v in names.items() if v not in state_dict]
    if missing:
        raise ConfigError(f"the {source} state dict lacks {len(missing)} tensors of this architecture, e.g. "
                          f"{', '.join(missing[:3])}.")
    head_key = _head_linear(model)
    report = LoadReport()
    skip_head = head == "skip"
    if head == "auto" and state_dict["fc.weight"].shape != ours[f"{head_key}.weight"].shape:
        skip_head = True
        report.note = (f"head left at init: the checkpoint has {state_dict['fc.weight'].shape[0]} classes, "
                       f"the model {ours[f'{head_key}.weight'].shape[0]}")
    new = {}
    for key, theirs in names.items():
        if skip_head and key.startswith(head_key + "."):
            continue
        value = state_dict[theirs]
        if value.shape != ours[key].shape:
            hint = " (head='skip' or 'auto' keeps the classifier at init)" if theirs.startswith("fc.") else ""
            raise ConfigError(f"{source} tensor {theirs} has shape {tuple(value.shape)}, this model's {key} "
                              f"{tuple(ours[key].shape)}: another width, depth or class count{hint}.")
        new[key] = value
    model.load_state_dict(new, strict=False)
    report.loaded = sorted(new)
    report.left_at_init = [k for k in ours if k not in new]
    opened = open_gates(model)
    if opened:
        report.note = "; ".join(filter(None, [report.note, f"{opened} gated blocks opened: starts as exactly the ResNet"]))
    return report


# A gate pre-activation whose sigmoid is exactly 1.0 in float32 and bfloat16 (1 - σ(20) = 2e-9 rounds away).
OPEN_GATE_BIAS = 20.0


def open_gates(model: nn.Module) -> int:
    """Open both gates of every `gated` block exactly (weights 0, bias OPEN_GATE_BIAS: c = t = 1), so the block is
    the ResNet block y = x + h(x) its loaded weights came from. The gates can still learn, slowly at first
    (σ'(20) ≈ 2e-9): a fine-tuning run that wants them to move sooner sets a smaller bias afterwards.
    Highway blocks are left as they are: y = (1 − t)·x + t·h(x) equals x + h(x) for no t. Returns the count."""
    opened = 0
    for block in model.blocks:
        if isinstance(block, ResidualBlock) and block.gate == "gated":
            with torch.no_grad():
                for gate in (block.carry_gate, block.transform_gate):
                    gate.proj.weight.zero_()
                    gate.proj.bias.fill_(OPEN_GATE_BIAS)
            opened += 1
    return opened


def load_torchvision_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], head: HeadMode = "load") -> LoadReport:
    """Load a torchvision ResNet state dict into a deepres ImageNet ResNet of the same depth, by name.

    Strict about names and shapes; tensors the checkpoint has no counterpart for (gates) stay at init
    and are listed in the report. head="skip" leaves the classifier at init (fine-tuning on other
    classes); "auto" does so only when the class counts differ.
    """
    return _load(model, state_dict, "torchvision", head)


def load_timm_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], head: HeadMode = "load") -> LoadReport:
    """Load a timm ResNet state dict (standard stem and 1x1-conv shortcuts) by name; as load_torchvision_weights."""
    return _load(model, state_dict, "timm", head)


def export_torchvision_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under torchvision's names; refused if the model has tensors torchvision lacks."""
    names = torchvision_names(model)
    extra = [k for k in model.state_dict() if k not in names]
    if extra:
        raise ConfigError(f"this model has {len(extra)} tensors torchvision's ResNet has no place for (e.g. "
                          f"{extra[0]}): only gate='residual' models export to torchvision or timm.")
    return {names[k]: v.detach().clone() for k, v in model.state_dict().items()}


export_timm_weights = export_torchvision_weights  # timm's ResNet uses the same names


def _load_weights_only(path: str) -> object:
    """torch.load that builds only tensors and containers; a file it cannot read (a pickle of anything else, not
    a torch file at all) is refused in one line naming what it asked for."""
    try:
        with warnings.catch_warnings():  # torch warns about a plain pickle's protocol before refusing it
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        asked = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"would call `{asked[1]}` (loading it could run code)" if asked else "is not a torch.save file of tensors"
        raise ConfigError(f"model.init_from={path!r} {what}. Give a state dict or checkpoint written by torch.save "
                          "(.pth, .pt, .ckpt) or a .safetensors file.") from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ConfigError(f"model.init_from={path!r} cannot be read as a torch file ({str(err).splitlines()[0]}). "
                          "Give a state dict or checkpoint written by torch.save (.pth, .pt, .ckpt) or a .safetensors "
                          "file.") from None


def load_weights_file(model: nn.Module, path: str, head: HeadMode = "auto") -> LoadReport:
    """Initialise `model` from a file: a deepres/Lightning checkpoint, or a torchvision/timm ResNet state dict.

    `.pth`/`.pt`/`.ckpt` files are read with torch.load(weights_only=True); `.safetensors` needs the
    safetensors package. A Lightning checkpoint's `state_dict` under `net.` (deepres's Classifier) loads
    with deepres's own names.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"model.init_from={path!r}: no such file.")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ConfigError(f"model.init_from={path!r} is a safetensors file: `pip install safetensors`.") from exc
        state = load_file(path)
    else:
        state = _load_weights_only(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.init_from={path!r} holds no state dict of tensors.")
    if any(k.startswith("net.") for k in state):  # a deepres training checkpoint
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if "conv1.weight" in state and "fc.weight" in state:
        return _load(model, state, "torchvision/timm", head)
    ours = model.state_dict()
    bad = [k for k, v in state.items() if k not in ours or v.shape != ours[k].shape]
    if bad:
        k = bad[0]
        got = tuple(state[k].shape)
        want = tuple(ours[k].shape) if k in ours else "no such tensor"
        raise ConfigError(f"model.init_from={path!r}: {len(bad)} tensors do not fit this model, e.g. {k} "
                          f"{got} vs {want}. Build the same architecture, or give a torchvision/timm ResNet.")
    model.load_state_dict(state, strict=False)
    return LoadReport(sorted(state), [k for k in ours if k not in state])
