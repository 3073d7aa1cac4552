import os

import pytest
import torch

# Two cores: keep each test process to one intra-op thread so spawned DDP ranks do not oversubscribe.
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine (see README: what was run here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
