"""The deepres model zoo: one residual family, y = g(x)·x + t(x)·h(x).

Single-device code only: nothing here imports lightning, deepspeed, wandb or torch.distributed.
Parallelism, checkpointing and compilation are applied to these models from outside.
"""

from deepres.models import highway, lstm, resnet  # noqa: F401  (registers the models)
from deepres.models.blocks import GATES, BlockStack, Gate, GateActivation, ResidualBlock
from deepres.models.pretrained import (
    LoadReport,
    export_timm_weights,
    export_torchvision_weights,
    load_timm_weights,
    load_torchvision_weights,
    load_weights_file,
)
from deepres.models.registry import create_model, list_models, model_arguments, register_model

__all__ = [
    "GATES", "BlockStack", "Gate", "GateActivation", "LoadReport", "ResidualBlock", "create_model",
    "export_timm_weights", "export_torchvision_weights", "list_models", "load_timm_weights",
    "load_torchvision_weights", "load_weights_file", "model_arguments", "register_model",
]
