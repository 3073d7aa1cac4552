"""GPU acceptance run: every CUDA path of deepres on one device, one table.

    python scripts/tools/gpu_check.py                   # one CUDA GPU, no network: at most 8 minutes
    python scripts/tools/gpu_check.py --only resnet50 highway_resnet50    # a few steps again
    python scripts/tools/gpu_check.py --dry-run         # on CPU: checks this script's own plumbing (< 1 min)

Steps, in this order (the most informative first, so a short budget loses the least):
  peak              a large bf16 torch.matmul (n = 8192, best of 10): the peak every MFU is taken against
  resnet50          `deepres fit` ResNet-50, bf16-mixed, channels_last, batch 256 at 224²: images/s, MFU
  highway_resnet50  the same with gate=highway (the grouped 1x1 gate convolutions' CUDA path): MFU and
                    step time ÷ ResNet-50's
  preact1001        PreAct-ResNet-1001 at the paper's batch (128, fp32) with √L activation checkpointing:
                    peak torch.cuda.max_memory_allocated against a prediction measured on the CPU
  ddp               `deepres fit --trainer.strategy ddp` with one rank: the process group's backend (NCCL)
                    and torch's fused SGD kernel on CUDA
  fp16              16-mixed with dynamic loss scaling (Lightning's GradScaler): the scale, a finite loss
  zero2, zero3      DeepSpeed ZeRO stage 2 / 3 on one GPU, bf16
  lstm              deepres's `lstm` against torch.nn.LSTM (cuDNN) on the same sequences
  shards            ShardDataModule's worker processes feeding the GPU (normalised on the device) against
                    decoding the same JPEGs on the GPU (torchvision.io.decode_jpeg, nvJPEG)
  channels_last     ResNet-50 bf16 in NCHW: what channels_last buys
  compile           ResNet-50 bf16 channels_last with every block torch.compile'd (Inductor, Triton)
  deepspeed_ops     JIT-building DeepSpeed's FusedAdam CUDA op and taking one step with it

Each step runs in its own Python process under a time limit (its budget, and never past the run's
8 minutes): a CUDA error, an out-of-memory, a hung NCCL call or a crash fails that step only, with its
error in the table, and the next step starts on a clean device. Each step's whole output (tracebacks;
for a step past its time, faulthandler's stack of every thread) goes to runs/gpu_check/<step>.log.

The `deepres fit` steps are the real command line (`deepres.training.cli.main`) with every default on
(diagnostics, the checkpoint at the end); only the data is one fixed uint8 batch in pinned memory
(`ProbeData`), normalised on the device by the shard pipeline's own code, so that they time the
training loop, not a data pipeline (the `shards` step times that). Their clock is read at the start of
step `warmup` and of step `warmup + steps`, each time after torch.cuda.synchronize(), so warm-up and
compilation are excluded. FLOPs per image are counted by torch.utils.flop_counter.FlopCounterMode on
the meta device (forward; training ≈ 3 × forward); MFU = training FLOPs per image × images/s ÷ the
bf16 matmul peak of the same run.

`--dry-run` needs no GPU: every CUDA step is reported as skipped and everything else runs for real on
the CPU: argument parsing; the models (on the meta device for the FLOP counts, on the CPU for the
memory prediction at a small batch and for the LSTM's output check); the JPEGs and shards; the
`deepres fit` command lines, parsed by the CLI with their strategies resolved for a CUDA device; the
table, CSV and Markdown writers and the environment. Writes gpu_check.{csv,md} and
gpu_check_summary.md (a dry run: gpu_check_dry_run.*).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # bench_memory, bench_shards
from evidence import command_line, write_csv  # scripts/ is on sys.path
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from deepres.data.base import DeepresDataModule
from deepres.data.shards import ShardDataModule
from deepres.models import create_model
from deepres.training.run_dir import environment, package_versions

TOTAL_BUDGET_S = 465  # the whole run, prepare steps included (the rest of 8 minutes: imports, writing)
RESULT_PREFIX = "GPU_CHECK_RESULT "
MFU_TARGET = 0.35  # ResNet-50 bf16 on an H100/H200-class GPU
HIGHWAY_TARGET = 1.15  # Highway-ResNet-50 ÷ ResNet-50 step time (scripts/benchmarks/bench_model_cost.py's target)
REFERENCE_MFU = "NVIDIA's ResNet-50 example: ≈ 0.19 on an A100 with AMP"
GIB = 2**30


# ---------------------------------------------------------------------------------------------------------
# The training loop's probe: one fixed batch, the clock, and what the trainer was really running
# ---------------------------------------------------------------------------------------------------------


class _Repeat:
    """The same batch `length` times: a loader with a length and no per-step host work but the copy."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor], length: int):
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for _ in range(self.length):
            yield self.batch


class ProbeData(DeepresDataModule):
    """One fixed uint8 batch (pinned when CUDA is there) fed `last + 1` times; it also holds the clock.

    Lightning calls `on_before_batch_transfer` once per training step, after the batch is fetched; at
    step `first` and step `last` it synchronises the device and reads the clock, and at `last` it
    records what the trainer is running (strategy, backend, precision, optimizer, memory layout,
    compiled blocks, peak memory). The record goes to the class attribute `record`, because
    jsonargparse builds the instance inside `deepres fit`. Images are normalised on the device by
    ShardDataModule's own `normalize` (the method is shared, not copied)."""

    record: dict[str, Any] = {}

    def __init__(self, batch_size: int = 32, shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10,
                 first: int = 5, last: int = 25):
        super().__init__(batch_size)
        self.num_classes, self.input_shape = num_classes, tuple(shape)
        self.first, self.last = first, last
        self.recipe = "imagenet"  # ShardDataModule.normalize's per-channel mean and std
        self._norm: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.start = 0.0

    normalize = ShardDataModule.normalize
    on_after_batch_transfer = ShardDataModule.on_after_batch_transfer

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (self.batch_size, *self.input_shape), dtype=torch.uint8, generator=g)
        y = torch.randint(0, self.num_classes, (self.batch_size,), generator=g)
        self.batch = (x.pin_memory(), y.pin_memory()) if torch.cuda.is_available() else (x, y)

    def train_dataloader(self) -> _Repeat:
        return _Repeat(self.batch, self.last + 1)

    def val_dataloader(self) -> list:
        return []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        trainer = self.trainer
        if not trainer.training or trainer.global_step not in (0, self.first, self.last):
            return batch
        cuda = torch.cuda.is_available() and trainer.lightning_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        step = trainer.global_step
        if step == 0:
            ProbeData.record = {"t0": now}
        if step == self.first:
            self.start = now
            ProbeData.record["warmup_s"] = now - ProbeData.record.get("t0", now)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
        if step == self.last:
            seconds = (now - self.start) / (self.last - self.first)
            ProbeData.record.update(s_per_step=seconds, images_per_s=self.batch_size / seconds,
                                    **trainer_facts(trainer, cuda))
        return batch


def _torch_optimizer(opt: Any) -> Any:
    """The torch.optim optimizer inside Lightning's and DeepSpeed's wrappers."""
    for _ in range(4):
        if isinstance(opt, torch.optim.Optimizer) and "fused" in opt.defaults:
            return opt
        opt = getattr(opt, "optimizer", None)
    return opt


def trainer_facts(trainer, cuda: bool) -> dict[str, Any]:
    """What the trainer was running at this step, read from the objects themselves."""
    import torch.distributed as dist

    module = trainer.lightning_module
    facts: dict[str, Any] = {"strategy": type(trainer.strategy).__name__, "precision": str(trainer.precision),
                             "device": str(module.device)}
    if dist.is_available() and dist.is_initialized():
        facts["backend"] = str(dist.get_backend())
    opt = _torch_optimizer(trainer.optimizers[0]) if trainer.optimizers else None
    if opt is not None:
        facts["optimizer"] = type(opt).__name__
        facts["fused"] = bool(opt.defaults.get("fused"))
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        facts["loss_scale"] = float(scaler.get_scale())
    engine = trainer.strategy.model
    if hasattr(engine, "zero_optimization_stage"):  # a DeepSpeedEngine
        facts["zero_stage"] = int(engine.zero_optimization_stage())
        facts["ds_bf16"] = bool(engine.bfloat16_enabled())
    net = module.net
    conv = next((p for p in net.parameters() if p.ndim == 4 and p.numel() > 0), None)
    if conv is not None:
        facts["channels_last"] = bool(conv.is_contiguous(memory_format=torch.channels_last)
                                      and not conv.is_contiguous())
    blocks = getattr(net, "blocks", [])
    facts["compiled_blocks"] = sum(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    facts["blocks"] = len(blocks)
    if facts["compiled_blocks"]:  # what dynamo really made of them (past its recompile limit: eager)
        from torch._dynamo.utils import counters

        facts["graphs"] = int(counters["stats"]["unique_graphs"])
        facts["graph_breaks"] = int(sum(counters["graph_break"].values()))
    loss = trainer.callback_metrics.get("train/loss")
    if loss is not None:
        facts["loss"] = float(loss)
    if cuda:
        facts["peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return facts


def fit_argv(args: list[str], *, batch: int, shape: tuple[int, ...], num_classes: int, warmup: int, steps: int,
             root: str, name: str, accelerator: str = "cuda") -> list[str]:
    """The `deepres fit` command line of a probe run: `args` plus the probe data and a short schedule."""
    data = {"class_path": f"{ProbeData.__module__}.ProbeData",
            "init_args": {"batch_size": batch, "shape": list(shape), "num_classes": num_classes,
                          "first": warmup, "last": warmup + steps}}
    return ["fit", *args, "--data", json.dumps(data), "--trainer.accelerator", accelerator,
            "--trainer.devices", "1", "--trainer.max_steps", str(warmup + steps + 1), "--trainer.max_epochs", "1",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--wandb.enabled", "false", "--run.root", root, "--run.name", name]


def fit_probe(argv: list[str], expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run `deepres fit` in this process and return ProbeData's record. Raises if the fit failed, if the
    loss is not finite, or if the trainer ran something else than `expect` says (None: must be there)."""
    from deepres.training.cli import main as deepres_main

    ProbeData.record = {}
    code = deepres_main(argv)
    if code != 0 or "s_per_step" not in ProbeData.record:
        raise RuntimeError(f"deepres fit exited with {code} before the timed steps ended")
    record = dict(ProbeData.record)
    record.pop("t0", None)
    check_record(record, expect or {})
    return record


def check_record(record: dict[str, Any], expect: dict[str, Any]) -> None:
    if not math.isfinite(record.get("loss", 0.0)):
        raise RuntimeError(f"the training loss is {record['loss']}")
    for key, wanted in expect.items():
        if key not in record or (wanted is not None and record[key] != wanted):
            raise RuntimeError(f"the trainer ran {key} = {record.get(key)!r}, not {wanted!r}; what it ran: {record}")


def check_fit_argv(argv: list[str]) -> str:
    """Parse a probe's command line with the real CLI (`--print_config`: nothing is built or run) and
    resolve its strategy for a CUDA device, as `deepres fit` does before the Trainer starts."""
    from deepres.strategies import resolve_strategy
    from deepres.training.cli import main as deepres_main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = deepres_main([*argv, "--print_config"])
    except SystemExit as exit_:
        code = exit_.code or 0
    if code != 0:
        raise RuntimeError(f"deepres fit refused the probe's arguments (exit {code}): {error_line(err.getvalue())}")
    trainer = {"accelerator": "cuda", "devices": 1}
    for key in ("strategy", "precision"):
        if f"--trainer.{key}" in argv:
            trainer[key] = argv[argv.index(f"--trainer.{key}") + 1]
    strategy = resolve_strategy(trainer, batch_size=json.loads(argv[argv.index("--data") + 1])["init_args"]["batch_size"])
    if isinstance(strategy, str):
        return f"arguments parse; strategy {strategy}"
    config = getattr(strategy, "config", None) or {}
    stage = config.get("zero_optimization", {}).get("stage")
    precision = next((key for key in ("bf16", "fp16") if config.get(key, {}).get("enabled")), "fp32")
    return f"arguments parse; strategy {type(strategy).__name__} (ZeRO stage {stage}, {precision})"


# ---------------------------------------------------------------------------------------------------------
# Measurements on the device
# ---------------------------------------------------------------------------------------------------------


def forward_flops_per_image(arch: str, shape: tuple[int, ...], **overrides) -> float:
    """Forward FLOPs of one image, counted on the meta device (no memory, no arithmetic)."""
    with torch.device("meta"):
        net = create_model(arch, **overrides)
        x = torch.empty(2, *shape)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x)
    return counter.get_total_flops() / 2


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def device_seconds(fn: Callable[[], Any], device: str, warmup: int, reps: int) -> list[float]:
    """Seconds of each of `reps` calls of fn after `warmup` calls: bracketed by CUDA events on a GPU (the
    device's own clock, no host round trip inside), by the host clock elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def gpu_description() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    driver = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    nccl = None
    with contextlib.suppress(Exception):  # a torch built without NCCL raises here; the peak is still good
        nccl = torch.cuda.nccl.version()
    return {"name": props.name, "memory_gib": round(props.total_memory / GIB, 1),
            "capability": f"{props.major}.{props.minor}", "sm_count": props.multi_processor_count,
            "driver": driver, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else nccl}


def run_peak(s: dict, prepared: dict) -> dict:
    n, device = s["matmul_size"], s["device"]
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best = min(device_seconds(lambda: torch.matmul(a, b), device, warmup=3, reps=10))
    gpu = gpu_description() if torch.device(device).type == "cuda" else None
    return {"peak_flops": 2 * n**3 / best, "gpu": gpu}


def image_fit_args(gate: str | None, channels_last: bool, compile: bool) -> list[str]:
    args = ["--model.arch", "resnet50", "--trainer.precision", "bf16-mixed",
            "--model.memory.channels_last", str(channels_last).lower(), "--model.memory.compile", str(compile).lower()]
    return args + (["--model.gate", gate] if gate else [])


def imagenet_probe(name: str, gate: str | None = None, channels_last: bool = True, compile: bool = False) -> dict:
    """run and prepare of a ResNet-50-shaped `deepres fit` step."""

    def argv(s: dict, root: str) -> list[str]:
        return fit_argv(image_fit_args(gate, channels_last, compile), batch=s["image_batch"], shape=(3, 224, 224),
                        num_classes=1000, warmup=s["warmup"], steps=s["steps"], root=root, name=name,
                        accelerator=torch.device(s["device"]).type)

    def prepare(s: dict) -> dict:
        flops = forward_flops_per_image("resnet50", (3, 224, 224), **({"gate": gate} if gate else {}))
        return {"forward_flops": flops, "train_flops": 3 * flops, "checked": check_fit_argv(argv(s, s["work"]))}

    def run(s: dict, prepared: dict) -> dict:
        blocks = 16 if compile else 0  # ResNet-50: 3 + 4 + 6 + 3
        expect = {"channels_last": channels_last, "precision": "bf16-mixed", "compiled_blocks": blocks}
        return fit_probe(argv(s, s["work"]), expect)

    return {"run": run, "prepare": prepare}


def cifar_probe(name: str, args: list[str], expect: dict[str, Any]) -> dict:
    """run and prepare of a small `deepres fit` step (resnet20_cifar, 32², batch `cifar_batch`); `expect`:
    what the trainer must have run on a GPU (see fit_probe)."""

    def argv(s: dict, root: str) -> list[str]:
        return fit_argv(["--model.arch", "resnet20_cifar", *args], batch=s["cifar_batch"], shape=(3, 32, 32),
                        num_classes=10, warmup=s["warmup"], steps=s["steps"], root=root, name=name,
                        accelerator=torch.device(s["device"]).type)

    def prepare(s: dict) -> dict:
        return {"checked": check_fit_argv(argv(s, s["work"]))}

    def run(s: dict, prepared: dict) -> dict:
        return fit_probe(argv(s, s["work"]), expect if torch.device(s["device"]).type == "cuda" else {})

    return {"run": run, "prepare": prepare}


PREACT = "preact_resnet1001_cifar"


def prepare_preact(s: dict) -> dict:
    """The CPU-measured prediction. scripts/benchmarks/bench_memory.py measures activation memory (peak RSS during
    one training step with √L checkpointing, in a fresh process) at batches b and 2b; the difference is
    what b more images cost, which, scaled to the paper's batch, leaves out the CPU's batch-independent
    overhead (oneDNN scratch space, allocator slack). Plus weights, gradients, SGD momentum and BN buffers."""
    from bench_memory import run as measure_on_cpu

    with torch.device("meta"):
        net = create_model(PREACT, num_classes=10)
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in net.buffers())
    b = s["predict_batch"]
    small, large = (measure_on_cpu(PREACT, {}, batch, "sqrt", 0, 1, s["predict_threads"]) for batch in (b, 2 * b))
    per_image = (large["activation_bytes"] - small["activation_bytes"]) / b
    if per_image <= 0:
        raise RuntimeError(f"activation memory on the CPU did not grow with the batch ({small['activation_bytes']} "
                           f"bytes at {b}, {large['activation_bytes']} at {2 * b}): the machine is too busy to measure")
    static = 3 * param_bytes + buffer_bytes  # weights, gradients, momentum buffers; BN statistics
    return {"blocks": large["blocks"], "k": large["k"], "cpu_batches": [b, 2 * b],
            "cpu_activation_bytes": [small["activation_bytes"], large["activation_bytes"]],
            "per_image_bytes": per_image, "static_bytes": static,
            "predicted_activation_bytes": per_image * s["preact_batch"],
            "predicted_peak_bytes": static + per_image * s["preact_batch"]}


def run_preact(s: dict, prepared: dict) -> dict:
    """bench_memory.py's step on the device: SGD with momentum, warm-up step, then the measured step."""
    from deepres.parallelize.activation_checkpoint import apply_activation_checkpointing

    device = s["device"]
    torch.manual_seed(0)
    net = create_model(PREACT, num_classes=10).to(device)
    k = apply_activation_checkpointing(net, "sqrt")
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(s["preact_batch"], 3, 32, 32, device=device)
    y = torch.randint(0, 10, (s["preact_batch"],), device=device)

    def step():
        opt.zero_grad(set_to_none=False)
        F.cross_entropy(net(x), y).backward()
        opt.step()

    step()
    if torch.device(device).type != "cuda":  # the CPU's numbers are the prediction itself
        return {"k": k, "s_per_step": min(device_seconds(step, device, warmup=0, reps=1))}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seconds = device_seconds(step, device, warmup=0, reps=2)
    peak = torch.cuda.max_memory_allocated()
    return {"k": k, "peak_bytes": peak, "activation_bytes": peak - before, "before_bytes": before,
            "s_per_step": min(seconds)}


def lstm_models(s: dict, device: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """deepres's `lstm`, and torch.nn.LSTM with the same head, for sequences of (value, marker) pairs."""
    H = s["lstm_hidden"]
    torch.manual_seed(0)
    ours = create_model("lstm", input_size=2, hidden_size=H, output_size=1).to(device)
    return ours, nn.LSTM(2, H, batch_first=True).to(device), nn.Linear(H, 1).to(device)


def prepare_lstm(s: dict) -> dict:
    """Both models on the CPU give one output per sequence, from the same input."""
    ours, ref, head = lstm_models(s, "cpu")
    x = torch.randn(2, 5, 2)
    with torch.no_grad():
        shapes = {tuple(ours(x).shape), tuple(head(ref(x)[0][:, -1]).shape)}
    if shapes != {(2, 1)}:
        raise RuntimeError(f"the two LSTMs give outputs of shapes {sorted(shapes)}, not (2, 1) each")
    return {"parameters": sum(p.numel() for p in ours.parameters())}


def run_lstm(s: dict, prepared: dict) -> dict:
    """Training step (forward, MSE at the sequence end, backward) of deepres's `lstm` and of
    torch.nn.LSTM + the same head on the same sequences, fp32."""
    B, T, device = s["lstm_batch"], s["lstm_steps"], s["device"]
    ours, ref, head = lstm_models(s, device)
    x, y = torch.randn(B, T, 2, device=device), torch.randn(B, 1, device=device)

    def step_ours():
        ours.zero_grad(set_to_none=True)
        F.mse_loss(ours(x), y).backward()

    def step_ref():
        ref.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        out, _ = ref(x)
        F.mse_loss(head(out[:, -1]), y).backward()

    t_ours = statistics.median(device_seconds(step_ours, device, warmup=3, reps=s["steps"]))
    t_ref = statistics.median(device_seconds(step_ref, device, warmup=3, reps=s["steps"]))
    layer = ours.blocks[0]
    return {"deepres_s": t_ours, "cudnn_s": t_ref, "implementation": f"{type(layer).__module__}.{type(layer).__name__}",
            "cudnn": torch.device(device).type == "cuda" and torch.backends.cudnn.is_acceptable(x)}


def prepare_shards(s: dict) -> dict:
    """Photo-like JPEGs (scripts/benchmarks/bench_shards.py's generator) written to shards by `deepres shard`."""
    from bench_shards import make_images

    from deepres.data import shard_writer

    root = Path(s["work"]) / "shards_data"
    folder, shards = root / "images", root / "shards"
    start = time.perf_counter()
    make_images(folder, s["shard_images"], 10, (500, 375))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        code = shard_writer.main([str(folder), str(shards), "--split", "train", "--workers", str(s["workers"]),
                                  "--shard-size", "256"])
    if code != 0:
        raise RuntimeError(f"deepres shard exited with {code}")
    index = json.loads((shards / "train" / "index.json").read_text())
    return {"folder": str(folder), "shards": str(shards), "images": index["num_samples"],
            "shard_files": len(index["shards"]), "prepare_s": time.perf_counter() - start}


def run_shards(s: dict, prepared: dict) -> dict:
    """Images/s into the device, normalised there: (a) ShardDataModule's CPU workers (decode, crop, flip),
    (b) nvJPEG: torchvision.io.decode_jpeg on the GPU, then the same crop and flip as tensor ops there.
    Both from the first batch on (worker start-up and nvJPEG's initialisation excluded)."""
    import random

    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import functional as TF

    from deepres.data.shard_stream import random_resized_crop_box

    batch, size, device = s["shard_batch"], 224, s["device"]
    dm = ShardDataModule(root=prepared["shards"], batch_size=batch, num_workers=s["workers"], image_size=size,
                         steps_per_epoch=s["shard_steps"])
    dm.setup("fit")
    batches = iter(dm.train_dataloader())
    images, _ = next(batches)
    dm.normalize(images.to(device, non_blocking=True))
    synchronize(device)
    start, n = time.perf_counter(), 0
    for images, labels in batches:
        dm.normalize(images.to(device, non_blocking=True))
        n += len(labels)
    synchronize(device)
    workers_rate = n / (time.perf_counter() - start)

    files = sorted(Path(prepared["folder"]).glob("*/*.JPEG"))
    data = [torchvision.io.read_file(str(f)) for f in files]
    rng = random.Random(0)

    def gpu_batch(chunk: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for img in decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device):
            top, left, h, w = random_resized_crop_box(img.shape[2], img.shape[1], rng)
            img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
            out.append(TF.horizontal_flip(img) if rng.random() < 0.5 else img)
        return dm.normalize(torch.stack(out))

    gpu_batch(data[:batch])
    synchronize(device)
    start, n = time.perf_counter(), 0
    for i in range(s["shard_steps"] - 1):
        chunk = [data[(i * batch + j) % len(data)] for j in range(batch)]
        gpu_batch(chunk)
        n += batch
    synchronize(device)
    nvjpeg_rate = n / (time.perf_counter() - start)
    return {"workers_images_per_s": workers_rate, "nvjpeg_images_per_s": nvjpeg_rate, "workers": s["workers"]}


def run_deepspeed_ops(s: dict, prepared: dict) -> dict:
    """JIT-build DeepSpeed's FusedAdam op into deepres's extension cache and take one step with it."""
    from deepspeed.accelerator import get_accelerator

    from deepres.strategies import use_persistent_extension_cache

    cache = use_persistent_extension_cache()
    builder = get_accelerator().create_op_builder("FusedAdamBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        raise RuntimeError("DeepSpeed reports FusedAdamBuilder incompatible here (it needs nvcc, the CUDA toolkit)")
    start = time.perf_counter()
    builder.load(verbose=False)
    build_s = time.perf_counter() - start
    from deepspeed.ops.adam import FusedAdam

    p = nn.Parameter(torch.ones(1024, device="cuda"))
    opt = FusedAdam([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    torch.cuda.synchronize()
    if not torch.all(p < 1):
        raise RuntimeError("FusedAdam's step did not move the parameter")
    return {"build_s": build_s, "cache": cache}


# ---------------------------------------------------------------------------------------------------------
# The steps, what each says in the table
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    path: str  # the table's first column
    budget_s: float
    run: Callable[[dict, dict], dict]
    prepare: Callable[[dict], dict] | None = None  # CPU work, in the parent, also in a dry run
    figure: Callable[[dict, dict], str] = lambda m, all_: ""  # (this step's numbers, every step's numbers)


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f} ms"


def _mfu(m: dict, all_: dict) -> float | None:
    peak = all_.get("peak", {}).get("peak_flops")
    if peak and "images_per_s" in m:
        return m["train_flops"] * m["images_per_s"] / peak
    return None


def fig_peak(m: dict, all_: dict) -> str:
    return f"bf16 matmul {m['peak_flops'] / 1e12:.0f} TFLOP/s" if "peak_flops" in m else ""


def fig_image(m: dict, all_: dict) -> str:
    parts = [f"training {m['train_flops'] / 1e9:.1f} GFLOP/image (3 × forward)"] if "train_flops" in m else []
    if "images_per_s" in m:
        parts.insert(0, f"{m['images_per_s']:.0f} images/s ({_ms(m['s_per_step'])}/step)")
        mfu = _mfu(m, all_)
        if mfu is not None:
            parts.insert(1, f"MFU {mfu:.3f}")
        parts.append(_layout(m))
    elif "checked" in m:
        parts.append(m["checked"])
    return "; ".join(p for p in parts if p)


def _layout(m: dict) -> str:
    bits = [m.get("precision", "")]
    if m.get("channels_last"):
        bits.append("channels_last")
    if m.get("compiled_blocks"):
        bits.append(f"{m['compiled_blocks']}/{m['blocks']} blocks compiled into {m.get('graphs')} graphs, "
                    f"{m.get('graph_breaks')} graph breaks")
    if "peak_bytes" in m:
        bits.append(f"peak {m['peak_bytes'] / GIB:.1f} GiB")
    return ", ".join(b for b in bits if b)


def fig_highway(m: dict, all_: dict) -> str:
    text = fig_image(m, all_)
    base = all_.get("resnet50", {})
    if "s_per_step" in m and "s_per_step" in base:
        text += f"; step ÷ ResNet-50 {m['s_per_step'] / base['s_per_step']:.3f} (target ≤ {HIGHWAY_TARGET})"
    return text


def fig_vs_resnet50(label: str) -> Callable[[dict, dict], str]:
    def figure(m: dict, all_: dict) -> str:
        base = all_.get("resnet50", {})
        if "s_per_step" not in m:
            return m.get("checked", "")
        text = f"{_ms(m['s_per_step'])}/step, {_layout(m)}; first {m['warmup_s']:.0f} s (warm-up)"
        if "s_per_step" in base:
            text += f"; {label} {m['s_per_step'] / base['s_per_step']:.3f}"
        return text

    return figure


def fig_fit(m: dict, all_: dict) -> str:
    if "s_per_step" not in m:
        return m.get("checked", "")
    bits = [f"{_ms(m['s_per_step'])}/step", m["strategy"]]
    if "backend" in m:
        bits.append(f"backend {m['backend']}")
    if "zero_stage" in m:
        bits.append(f"ZeRO stage {m['zero_stage']}{', bf16' if m.get('ds_bf16') else ''}")
    if "optimizer" in m:
        bits.append(f"{'fused ' if m['fused'] else ''}{m['optimizer']}")
    if "loss_scale" in m:
        bits.append(f"loss scale {m['loss_scale']:g}")
    if "loss" in m:
        bits.append(f"loss {m['loss']:.3f}")
    bits.append(_layout(m))
    return ", ".join(b for b in bits if b)


def fig_preact(m: dict, all_: dict) -> str:
    if "predicted_peak_bytes" not in m:
        return ""
    b, b2 = m["cpu_batches"]
    predicted = (f"predicted {m['predicted_peak_bytes'] / GIB:.2f} GiB (activations "
                 f"{m['predicted_activation_bytes'] / GIB:.2f} GiB: {m['per_image_bytes'] / 2**20:.1f} MB per image, "
                 f"measured on the CPU at batches {b} and {b2}; k = {m['k']} of {m['blocks']} blocks)")
    if "peak_bytes" not in m:
        return predicted
    return (f"peak {m['peak_bytes'] / GIB:.2f} GiB, {predicted}; measured ÷ predicted "
            f"{m['peak_bytes'] / m['predicted_peak_bytes']:.2f} (activations "
            f"{m['activation_bytes'] / m['predicted_activation_bytes']:.2f}); {m['s_per_step']:.2f} s/step")


def fig_lstm(m: dict, all_: dict) -> str:
    if "deepres_s" not in m:
        return f"deepres lstm ({m['parameters']} parameters) and nn.LSTM built; outputs agree in shape" if m else ""
    return (f"deepres {_ms(m['deepres_s'])}, cuDNN {_ms(m['cudnn_s'])} per step: deepres ÷ cuDNN "
            f"{m['deepres_s'] / m['cudnn_s']:.2f} ({m['implementation']})")


def fig_shards(m: dict, all_: dict) -> str:
    made = f"{m['images']} JPEGs in {m['shard_files']} shards" if "images" in m else ""
    if "workers_images_per_s" not in m:
        return made
    a, b = m["workers_images_per_s"], m["nvjpeg_images_per_s"]
    faster = "GPU decoding faster" if b > a else "CPU workers faster"
    text = (f"{m['workers']} CPU workers {a:.0f} images/s, nvJPEG on the GPU {b:.0f} images/s ({faster}, "
            f"{max(a, b) / min(a, b):.2f}×); {made}")
    if "images_per_s" in all_.get("resnet50", {}):
        text += f"; ResNet-50 trains on {all_['resnet50']['images_per_s']:.0f} images/s"
    return text


def fig_ops(m: dict, all_: dict) -> str:
    return f"FusedAdam built in {m['build_s']:.0f} s, one step taken" if "build_s" in m else ""


def steps_of(s: dict) -> list[Step]:
    return [
        Step("peak", "bf16 matmul peak (torch.matmul)", 30, run_peak, figure=fig_peak),
        Step("resnet50", "ResNet-50, bf16-mixed, channels_last", 75, **imagenet_probe("resnet50"), figure=fig_image),
        Step("highway_resnet50", "Highway-ResNet-50 (grouped gate convs), bf16, channels_last", 75,
             **imagenet_probe("highway_resnet50", gate="highway"), figure=fig_highway),
        Step("preact1001", f"PreAct-ResNet-1001, batch {s['preact_batch']}, √L checkpointing", 75, run_preact,
             prepare_preact, fig_preact),
        Step("ddp", "DDP, one NCCL rank, fused SGD", 60, **cifar_probe("ddp", ["--trainer.strategy", "ddp"],
                                                                    {"backend": "nccl", "fused": True}),
             figure=fig_fit),
        Step("fp16", "16-mixed, dynamic loss scaling", 60, **cifar_probe("fp16", ["--trainer.precision", "16-mixed"],
                                                                      {"precision": "16-mixed", "loss_scale": None}),
             figure=fig_fit),
        Step("zero2", "DeepSpeed ZeRO-2, one GPU, bf16", 75, **cifar_probe(
            "zero2", ["--trainer.strategy", "deepspeed_stage_2", "--trainer.precision", "bf16-mixed"],
            {"zero_stage": 2, "ds_bf16": True}), figure=fig_fit),
        Step("zero3", "DeepSpeed ZeRO-3, one GPU, bf16", 75, **cifar_probe(
            "zero3", ["--trainer.strategy", "deepspeed_stage_3", "--trainer.precision", "bf16-mixed"],
            {"zero_stage": 3, "ds_bf16": True}), figure=fig_fit),
        Step("lstm", f"LSTM (T = {s['lstm_steps']}, H = {s['lstm_hidden']}) vs cuDNN nn.LSTM", 45, run_lstm, prepare_lstm,
             fig_lstm),
        Step("shards", "shard loader → GPU, normalised on the device; nvJPEG", 75, run_shards, prepare_shards,
             fig_shards),
        Step("channels_last", "ResNet-50 bf16 in NCHW (channels_last off)", 60,
             **imagenet_probe("resnet50_nchw", channels_last=False), figure=fig_vs_resnet50("NCHW ÷ channels_last step time")),
        Step("compile", "ResNet-50 bf16 channels_last, per-block torch.compile", 150,
             **imagenet_probe("resnet50_compile", compile=True), figure=fig_vs_resnet50("compiled ÷ eager step time")),
        Step("deepspeed_ops", "DeepSpeed op build (FusedAdam, JIT)", 120, run_deepspeed_ops, figure=fig_ops),
    ]


STEP_NAMES = ("peak", "resnet50", "highway_resnet50", "preact1001", "ddp", "fp16", "zero2", "zero3", "lstm",
              "shards", "channels_last", "compile", "deepspeed_ops")


# ---------------------------------------------------------------------------------------------------------
# Running steps in child processes
# ---------------------------------------------------------------------------------------------------------


def error_line(stderr: str) -> str:
    """The line of a child's stderr that says why it failed: deepres's own one-paragraph message, a crash
    (faulthandler's "Fatal Python error"), else the last exception line (`SomeError: ...`), else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for pattern in (r"^deepres: error:", r"^Fatal Python error", r"^[\w.]*(Error|Exception|Interrupt|Exit)\b"):
        found = [line for line in lines if re.match(pattern, line)]
        if found:
            return found[-1][:300]
    return (lines or ["no output"])[-1][:300]


def run_child(cmd: list[str], timeout: float, log: Path | None = None) -> tuple[str, dict, str]:
    """(status, numbers, error) of a child that prints RESULT_PREFIX + JSON as its result; its whole
    output goes to `log`. A child past its time gets SIGABRT first, so that faulthandler writes the stack
    of every thread of every process of its session (ranks, data-loader and compile workers) to the log."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig, grace in ((signal.SIGABRT, 5), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                out, err = proc.communicate(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            out, err = "", ""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(cmd)}\n--- exit {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}\n")
    if timed_out:
        return "failed", {}, f"timed out after {timeout:.0f} s"
    results = [line[len(RESULT_PREFIX):] for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        return "failed", {}, f"exit {proc.returncode}: {error_line(err)}"
    return "ok", json.loads(results[-1]), ""


def child_main(name: str, payload: str) -> int:
    """Run one step's device part in this process and print its numbers."""
    warnings.filterwarnings("ignore")
    for logger in ("lightning", "lightning.pytorch", "lightning.fabric", "deepres", "DeepSpeed"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    data = json.loads(payload)
    step = next(st for st in steps_of(data["settings"]) if st.name == name)
    numbers = step.run(data["settings"], data["prepared"])
    print(RESULT_PREFIX + json.dumps(numbers), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_outputs(out_dir: Path, stem: str, rows: list[dict], numbers: dict, header: str, dry_run: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / f"{stem}.csv", [{**r, "numbers": json.dumps(numbers.get(r["step"], {}))} for r in rows])
    lines = ["### GPU acceptance run: every CUDA path on one device", "", header, "",
             "| path | result | key figure | s |", "| --- | --- | --- | ---: |"]
    for r in rows:
        result = r["status"] if not r["error"] else f"{r['status']}: {r['error']}"
        lines.append(f"| {_cell(r['path'])} | {_cell(result)} | {_cell(r['figure'])} | {r['seconds']:.0f} |")
    mfu, ratio = headline(numbers)
    lines += ["", f"ResNet-50 bf16 channels_last training MFU: **{_fmt(mfu)}** (target ≥ {MFU_TARGET} on an "
              f"H100/H200-class GPU; {REFERENCE_MFU}). Highway-ResNet-50 ÷ ResNet-50 step time: **{_fmt(ratio)}** "
              f"(target ≤ {HIGHWAY_TARGET}).", ""]
    (out_dir / f"{stem}.md").write_text("\n".join(lines))
    not_run = "not run (dry run on CPU)" if dry_run else "not measured (step failed)"
    summary = [
        ("GPU: ResNet-50 bf16 channels_last `deepres fit`, training FLOP/s ÷ bf16 matmul peak of the same run",
         mfu, f"≥ {MFU_TARGET} (H100/H200)", REFERENCE_MFU, lambda v: v >= MFU_TARGET),
        ("GPU: Highway-ResNet-50 ÷ ResNet-50 step time, bf16 channels_last", ratio, f"≤ {HIGHWAY_TARGET}", "—",
         lambda v: v <= HIGHWAY_TARGET),
    ]
    (out_dir / f"{stem}_summary.md").write_text("".join(
        f"| {name} | {_fmt(v)} | {target} | {paper} | "
        f"{not_run if v is None else ('met' if ok(v) else '**not met**')} |\n"
        for name, v, target, paper, ok in summary))


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def headline(numbers: dict) -> tuple[float | None, float | None]:
    """ResNet-50 MFU and Highway ÷ ResNet-50 step time, where both sides were measured."""
    r50, hw = numbers.get("resnet50", {}), numbers.get("highway_resnet50", {})
    ratio = hw["s_per_step"] / r50["s_per_step"] if "s_per_step" in hw and "s_per_step" in r50 else None
    return _mfu(r50, numbers), ratio


def describe_gpu(numbers: dict) -> str:
    gpu = numbers.get("peak", {}).get("gpu")
    v = package_versions()
    libs = f"deepspeed {v.get('deepspeed')}, torchvision {v.get('torchvision')}"
    if not gpu:
        return f"no CUDA device (dry run on CPU); torch CUDA build {torch.version.cuda}; {libs}"
    return (f"{gpu['name']} ({gpu['memory_gib']} GiB, compute capability {gpu['capability']}, {gpu['sm_count']} SMs), "
            f"driver {gpu['driver']}, CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']}, NCCL {gpu['nccl']}; {libs}")


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace, work: str) -> dict:
    cpus = os.cpu_count() or 1
    s = {"work": work, "device": "cuda", "warmup": args.warmup, "steps": args.steps, "image_batch": args.image_batch,
         "cifar_batch": 128, "preact_batch": 128, "predict_batch": 8, "predict_threads": cpus,
         "matmul_size": 8192, "lstm_batch": 256, "lstm_steps": 100, "lstm_hidden": 128,
         "shard_images": 1024, "shard_batch": 128, "shard_steps": 24, "workers": min(8, cpus)}
    if args.dry_run:  # the CPU parts at sizes a CPU finishes in seconds
        s.update(predict_batch=1, predict_threads=1, shard_images=24, workers=1)
    return s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="no GPU: skip every CUDA step, run the rest on CPU")
    parser.add_argument("--only", nargs="+", choices=STEP_NAMES,
                        help="run these steps only (MFU needs peak; the ratios need resnet50)")
    parser.add_argument("--budget", type=float, default=TOTAL_BUDGET_S, help="seconds for the whole run")
    parser.add_argument("--image-batch", type=int, default=256, help="per-step batch of the ResNet-50 steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of every `deepres fit` step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of every training step")
    parser.add_argument("--out-dir", type=Path, help="default: docs/results (a dry run: runs/gpu_check)")
    parser.add_argument("--log-dir", type=Path, default=Path("runs/gpu_check"),
                        help="every step's full output (tracebacks, stacks of a hung step)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--payload", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or Path("runs/gpu_check" if args.dry_run else "docs/results")
    if args.child:
        return child_main(args.child, args.payload)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is visible (torch.cuda.is_available() is False). Run it on a machine "
              "with a GPU, or with --dry-run to check the script itself on CPU.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    deadline = start + args.budget
    env = environment(torch.get_num_threads())
    print(env, flush=True)
    work = tempfile.mkdtemp(prefix="gpu_check_")
    settings = settings_from(args, work)
    rows, numbers = [], {}
    try:
        for step in steps_of(settings):
            if args.only and step.name not in args.only:
                continue
            t0 = time.perf_counter()
            status, error, measured = "ok", "", {}
            try:
                prepared = step.prepare(settings) if step.prepare else {}
            except Exception as exc:  # a step that cannot even be prepared is a failed step, not a failed run
                prepared, status, error = {}, "failed", f"preparing: {type(exc).__name__}: {exc}"[:300]
            left = deadline - time.perf_counter()
            if status == "ok" and args.dry_run:
                status, error = "skipped", "no CUDA device (dry run)"
            elif status == "ok" and left < 15:
                status, error = "not run", f"the run's {args.budget:.0f} s were spent"
            elif status == "ok":
                payload = json.dumps({"settings": settings, "prepared": prepared})
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", step.name, "--payload", payload]
                limit = min(step.budget_s, left)
                status, measured, error = run_child(cmd, limit, args.log_dir / f"{step.name}.log")
                if error.startswith("timed out"):
                    error += " (its budget)" if limit == step.budget_s else f" (the rest of the run's {args.budget:.0f} s)"
            numbers[step.name] = {**prepared, **measured}
            rows.append({"step": step.name, "path": step.path, "status": status, "error": error,
                         "seconds": time.perf_counter() - t0, "step_obj": step})
            print(f"[gpu_check] {step.name}: {status}{' — ' + error if error else ''} "
                  f"({rows[-1]['seconds']:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        r["figure"] = r.pop("step_obj").figure(numbers[r["step"]], numbers)
    seconds = time.perf_counter() - start
    header = (f"`{command_line('gpu_check.py', argv)}` — {describe_gpu(numbers)}. Host: {env}. "
              f"`deepres fit` steps: {args.warmup} warm-up + {args.steps} timed steps; whole run {seconds / 60:.1f} min.")
    stem = "gpu_check_dry_run" if args.dry_run else "gpu_check"
    write_outputs(args.out_dir, stem, rows, numbers, header, args.dry_run)
    print((args.out_dir / f"{stem}.md").read_text())
    print(f"wrote {args.out_dir}/{stem}.csv, {stem}.md, {stem}_summary.md"
          + ("" if args.dry_run else f"; each step's whole output: {args.log_dir}/<step>.log"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
