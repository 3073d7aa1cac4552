import os

# Two cores, often several processes (DDP ranks, CLI subprocesses): one intra-op thread each.
# Oversubscribed OpenMP threads spin against each other and make tiny-matmul steps ~20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


# pytest-xdist (pyproject's addopts: `-n auto --dist loadfile --no-loadscope-reorder`) runs each test file on one
# worker, in the order collected here. The files that take longest (several minutes of real processes each) go
# first, so that none of them starts last and runs alone while the other workers idle.
LONGEST_FIRST = ["test_slurm.py", "test_faults.py", "test_strategies.py", "test_pipeline.py", "test_examples.py",
                 "test_training.py", "test_scale.py", "test_shards.py", "test_slurm_submit.py", "test_scripts.py",
                 "test_checkpoints.py", "test_foreign_shards.py", "test_diagnostics_strategies.py", "test_gpu_check.py",
                 "test_models.py", "test_combinations.py"]


def _file_rank(item) -> int:
    name = item.path.name
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_rank)  # stable: the tests of a file keep their order
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU, and this machine has none (README: 'What the CPU tests run and what is only written for GPUs')")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
