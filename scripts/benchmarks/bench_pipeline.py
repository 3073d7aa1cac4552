"""Pipeline parallelism: per-stage memory, the measured bubble per schedule, and throughput against DDP.

    python scripts/benchmarks/bench_pipeline.py                     # 2 stages, 4 micro-batches, a 128-block highway MLP
                                                                    # a few minutes on 2 cores: 6 runs of 2 processes, 4 steps
                                                                    # of ~0.5 s each, most of the time in process start-up
    python scripts/benchmarks/bench_pipeline.py --stages 4 --microbatches 8 --depth 257 --width 512 --device cuda

One run prints, each against a named baseline measured in the same run:
  memory      per-stage peak memory ÷ the one-process peak memory of the same training step
              (target ≤ 1/S + 10 %). CPU: peak RSS above the process's RSS before the model exists (glibc's mmap
              threshold fixed at 64 KiB so freed tensors leave RSS); CUDA: torch.cuda.max_memory_allocated.
  bubble      per schedule: measured idle share ÷ the GPipe/1F1B formula (S − 1)/(M + S − 1). The idle share is
              1 − (the rank's own compute for the step, timed alone) ÷ (the pipelined step time), the mean over ranks.
  throughput  samples/s of each schedule ÷ samples/s of DDP on the same processes and the same global batch.
Each configuration runs in fresh processes (gloo on CPU, NCCL on CUDA), plain torch (deepres.pipeline, no
Lightning): SGD with momentum, warm-up steps first, the median of the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")


def worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from deepres.models import create_model
    from deepres.pipeline.runtime import Pipeline, layout_for
    from deepres.pipeline.split import block_ranges

    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    before = rss_bytes()
    torch.manual_seed(0)
    net = create_model("highway_mlp", depth=args.depth, width=args.width, in_features=args.width, num_classes=10)
    batch = args.batch  # the global batch
    g = torch.Generator().manual_seed(rank)
    pipe = None
    if args.mode == "pipeline":
        layout = layout_for(args.schedule, world, args.virtual_stages)
        ranges = block_ranges(net, layout.num_stages, "params")
        pipe = Pipeline.cut(net, ranges=ranges, layout=layout, pp_rank=rank, microbatches=args.microbatches,
                            schedule=args.schedule)
    net.to(device)
    params = [p for p in net.parameters()]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    rows = batch // world if args.mode == "ddp" else batch
    x = torch.randn(rows, args.width, generator=g).to(device)
    y = torch.randint(0, 10, (rows,), generator=g).to(device)
    if args.mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
    else:
        pipe.start(device, dist.group.WORLD, lambda out, target: F.cross_entropy(out, target))

        def step() -> None:
            pipe.train_step(x, y)
            opt.step()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes() - before
    step_s = sorted(times)[len(times) // 2]
    compute_s = None
    if pipe is not None:  # this rank's own work for one step, alone: every micro-batch forward and backward
        compute_s = _solo_compute(pipe, x, args, device, sync=cuda)
    out = {"rank": rank, "peak_bytes": peak, "step_s": step_s, "compute_s": compute_s}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, out)
        dist.destroy_process_group()
        return {"ranks": gathered}
    return {"ranks": [out]}


def _solo_compute(pipe, x, args, device, sync: bool) -> float:
    import torch

    best = float("inf")
    rows = x.shape[0] // args.microbatches
    for _ in range(max(args.steps, 2)):
        start = time.perf_counter()
        for module in pipe.modules:
            for _ in range(args.microbatches):
                inp = x[:rows] if module.first else torch.randn(rows, args.width, device=device, requires_grad=True)
                out = module(inp)
                out.backward(torch.ones_like(out))
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, mode: str, processes: int, schedule: str = "1f1b") -> dict:
    out = Path(f"/tmp/bench_pipeline_{os.getpid()}_{mode}_{schedule}_{processes}.json")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(processes),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [sys.executable, __file__, "--worker", "--mode", mode, "--schedule", schedule, "--out", str(out),
               *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("depth", "width", "batch", "microbatches", "virtual_stages", "steps", "warmup",
                          "threads", "device")]]
    ranks = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(processes)]
    for p in ranks:
        if p.wait(timeout=600) != 0:
            raise SystemExit(f"{mode} {schedule} on {processes} processes failed")
    result = json.loads(out.read_text())
    out.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--virtual-stages", type=int, default=2)
    parser.add_argument("--depth", type=int, default=129, help="highway_mlp depth (blocks = depth − 1)")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="pipeline", help=argparse.SUPPRESS)
    parser.add_argument("--schedule", default="1f1b", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args)
        if int(os.environ.get("RANK", 0)) == 0:
            Path(args.out).write_text(json.dumps(result))
        return

    from deepres.pipeline.runtime import bubble_fraction

    S, M = args.stages, args.microbatches
    print(f"highway_mlp depth {args.depth} width {args.width}, global batch {args.batch}, {S} stages, {M} micro-batches, "
          f"{args.device}, {args.threads} thread(s) per process; load average {os.getloadavg()[0]:.1f}")
    one = launch(args, "ddp", 1)["ranks"][0]
    ddp = launch(args, "ddp", S)["ranks"]
    ddp_step = max(r["step_s"] for r in ddp)
    print(f"one process: peak {one['peak_bytes'] / 2**20:.0f} MiB, step {one['step_s']:.3f} s; "
          f"DDP on {S} processes: step {ddp_step:.3f} s ({args.batch / ddp_step:.1f} samples/s)")
    formula = bubble_fraction(S, M)
    for schedule in args.schedules.split(","):
        ranks = launch(args, "pipeline", S, schedule)["ranks"]
        step = max(r["step_s"] for r in ranks)
        memory = [r["peak_bytes"] / one["peak_bytes"] for r in ranks]
        idle = sum(max(0.0, 1 - r["compute_s"] / r["step_s"]) for r in ranks) / len(ranks)
        virtual = args.virtual_stages if schedule in ("interleaved_1f1b", "zero_bubble") else 1
        print(f"{schedule:>17}: per-stage peak memory ÷ one process = {', '.join(f'{m:.3f}' for m in memory)} "
              f"(target ≤ {1 / S + 0.1:.3f}); measured bubble {idle:.3f} ÷ (S−1)/(M+S−1) {formula:.3f} = "
              f"{idle / formula:.2f} (its own theory: {bubble_fraction(S, M, virtual) if schedule != 'zero_bubble' else 0.0:.3f}); "
              f"throughput ÷ DDP = {ddp_step / step:.2f} ({args.batch / step:.1f} samples/s)")


if __name__ == "__main__":
    main()
