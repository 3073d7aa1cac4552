import os

# Two cores, often several processes (DDP ranks, CLI subprocesses): one intra-op thread each.
# Oversubscribed OpenMP threads spin against each other and make tiny-matmul steps ~20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU, and this machine has none (README: 'What the CPU tests run and what is only written for GPUs')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
