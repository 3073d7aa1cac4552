"""LSTM speed and memory: deepres `lstm` vs torch.nn.LSTM, and time checkpointing at T = 10,000.

    .venv/bin/python scripts/benchmarks/bench_lstm.py           # T = 100 and 1000, both cells; memory at T = 10,000: ~3 min on one core
    .venv/bin/python scripts/benchmarks/bench_lstm.py --quick   # smoke test: T = 20 and 50, memory at T = 200

Speed: one training forward + backward (MSE at the sequence end, fp32, batch 32, hidden 64, input 2)
of deepres.models.create_model("lstm", cell=...) and of torch.nn.LSTM(2, 64, batch_first=True) with
the same linear head. Every trial times one step of each side, in alternating order, after untimed
warm-up steps; ratios are taken within a trial and summarised by their median. The 1997 cell (no
forget gate) is timed against the same nn.LSTM: it runs through the same kernel with its forget
gate pinned at 1.0. Target: deepres ÷ torch.nn.LSTM ≤ 1.2.

Memory: peak resident memory of one training step (1997 cell, batch 32, hidden 64) at T = 10,000,
with `time_checkpoint="sqrt"` (the state kept every √T = 100 steps, recomputed in backward) and
without, each in a fresh process with glibc's mmap threshold fixed at 64 KiB so that freed tensors
leave RSS at once (as in scripts/benchmarks/bench_memory.py); on a GPU, torch.cuda.max_memory_allocated.
Writes bench_lstm.{csv,md,png} and bench_lstm_summary.md to --out-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from deepres.models import create_model

SPEED_TARGET = 1.2
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import command_line, peak_rss_bytes, rss_bytes, write_csv  # noqa: E402  (scripts/ is on sys.path)

from deepres.training.run_dir import environment  # noqa: E402

BATCH, HIDDEN = 32, 64


class TorchLSTM(nn.Module):
    """The baseline: torch.nn.LSTM with deepres's head, reading the last step."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(2, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def train_step(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    net.zero_grad(set_to_none=True)
    nn.functional.mse_loss(net(x), y).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def speed(cell: str, seq_len: int, trials: int, warmup: int, device: str) -> dict:
    torch.manual_seed(0)
    sides = {"deepres": create_model("lstm", cell=cell, hidden_size=HIDDEN).to(device), "torch.nn.LSTM": TorchLSTM().to(device)}
    x, y = torch.randn(BATCH, seq_len, 2, device=device), torch.rand(BATCH, 1, device=device)
    for _ in range(warmup):
        for net in sides.values():
            train_step(net, x, y)
    times = {name: [] for name in sides}
    order = list(sides)
    for trial in range(trials):
        for name in order if trial % 2 == 0 else order[::-1]:  # alternate which side goes first
            times[name].append(train_step(sides[name], x, y))
    ratios = [a / b for a, b in zip(times["deepres"], times["torch.nn.LSTM"], strict=True)]
    return {"cell": cell, "seq_len": seq_len, "trials": trials,
            "deepres_s": statistics.median(times["deepres"]), "torch_lstm_s": statistics.median(times["torch.nn.LSTM"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def memory_worker(seq_len: int, every: str, device: str) -> dict:
    """One process: a warm-up step (gradients exist), then the peak memory of one more step above
    the memory before it."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = create_model("lstm", cell="1997", hidden_size=HIDDEN, time_checkpoint=0 if every == "none" else every).to(device)
    x, y = torch.randn(BATCH, seq_len, 2, device=device), torch.rand(BATCH, 1, device=device)
    train_step(net, x, y)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        seconds = train_step(net, x, y)
        peak = torch.cuda.max_memory_allocated() - before
    else:
        before = rss_bytes()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        seconds = train_step(net, x, y)
        peak = peak_rss_bytes() - before
    return {"time_checkpoint": every, "seq_len": seq_len, "peak_bytes": peak, "step_s": seconds}


def memory(seq_len: int, every: str, device: str) -> dict:
    """Peak memory from one process with the fixed mmap threshold; step time from another with the
    default allocator (the fixed threshold slows every large allocation)."""
    def run(env: dict) -> dict:
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps([seq_len, every, device])],
                             capture_output=True, text=True, check=True, env=env).stdout
        return json.loads(out.strip().splitlines()[-1])

    mem = run({**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"})
    return {**mem, "step_s": run(dict(os.environ))["step_s"]}


def write_table(path: Path, rows: list[dict], mem: dict[str, dict], header: str) -> None:
    ratio = mem["sqrt"]["peak_bytes"] / mem["none"]["peak_bytes"]
    lines = [
        "### LSTM speed: deepres `lstm` ÷ torch.nn.LSTM, and memory with time checkpointing",
        "",
        header,
        "",
        f"One training forward + backward, batch {BATCH}, hidden {HIDDEN}, input 2, fp32; median of per-trial ratios",
        f"(sides alternating within each trial; min–max in brackets). Target ≤ {SPEED_TARGET}.",
        "",
        "| cell | T | deepres (s) | torch.nn.LSTM (s) | deepres ÷ torch.nn.LSTM | trials | verdict |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        verdict = "**met**" if r["ratio"] <= SPEED_TARGET else "**not met**"
        lines.append(f"| {r['cell']} | {r['seq_len']:,} | {r['deepres_s']:.4f} | {r['torch_lstm_s']:.4f} | "
                     f"{r['ratio']:.3f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) | {r['trials']} | {verdict} |")
    T = mem["none"]["seq_len"]
    lines += [
        "",
        f"Peak memory of one training step at T = {T:,} (1997 cell, batch {BATCH}, hidden {HIDDEN}), fresh process each:",
        "",
        "| time checkpointing | peak memory (MB) | step (s) |",
        "| --- | ---: | ---: |",
        *(f"| {k} | {m['peak_bytes'] / 2**20:.1f} | {m['step_s']:.2f} |" for k, m in mem.items()),
        "",
        f"With √T checkpointing ÷ without: memory **{ratio:.3f}**, step time "
        f"{mem['sqrt']['step_s'] / mem['none']['step_s']:.2f} (Gruslys et al. 2016: −95 % memory for +33 % time at T = 1000).",
        "",
        "![LSTM speed](results/bench_lstm.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def write_summary(path: Path, rows: list[dict], mem: dict[str, dict]) -> None:
    lines = [f"| LSTM {r['cell']} T = {r['seq_len']:,}: deepres ÷ torch.nn.LSTM, forward + backward | {r['ratio']:.3f} | "
             f"≤ {SPEED_TARGET} | — | {'met' if r['ratio'] <= SPEED_TARGET else '**not met**'} |" for r in rows]
    ratio = mem["sqrt"]["peak_bytes"] / mem["none"]["peak_bytes"]
    lines.append(f"| LSTM T = {mem['none']['seq_len']:,}: peak memory with √T time checkpointing ÷ without | {ratio:.3f} | "
                 f"bounded | 0.05 at T = 1,000 (Gruslys et al. 2016) | {'met' if ratio < 0.2 else '**not met**'} |")
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['cell']}, T={r['seq_len']}" for r in rows]
    ax.bar(labels, [r["ratio"] for r in rows], color=["tab:green" if r["cell"] == "1997" else "tab:blue" for r in rows])
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(SPEED_TARGET, color="tab:red", ls=":", label=f"target ≤ {SPEED_TARGET}")
    ax.set_ylabel("deepres ÷ torch.nn.LSTM step time")
    ax.set_title("LSTM forward + backward, batch 32, hidden 64", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--trials", type=int, default=20, help="alternating trials at T <= 100 (longer T: half as many)")
    parser.add_argument("--memory-seq-len", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/results"))
    parser.add_argument("--quick", action="store_true", help="smoke test: T = 20 and 50, 4 trials, memory at T = 200")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(memory_worker(*json.loads(args.worker))))
        return 0
    if args.quick:
        args.seq_lens, args.trials, args.memory_seq_len = [20, 50], 4, 200
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(env, flush=True)
    rows = []
    for seq_len in args.seq_lens:
        for cell in ("1997", "1999"):
            trials = args.trials if seq_len <= 100 else max(3, args.trials // 2)
            rows.append(speed(cell, seq_len, trials, warmup=2, device=args.device))
            r = rows[-1]
            print(f"cell {cell} T = {seq_len}: deepres {r['deepres_s']:.4f} s, torch.nn.LSTM {r['torch_lstm_s']:.4f} s, "
                  f"ratio {r['ratio']:.3f} (target <= {SPEED_TARGET})", flush=True)
    mem = {every: memory(args.memory_seq_len, every, args.device) for every in ("none", "sqrt")}
    ratio = mem["sqrt"]["peak_bytes"] / mem["none"]["peak_bytes"]
    print(f"T = {args.memory_seq_len}: peak memory {mem['none']['peak_bytes'] / 2**20:.1f} MB without, "
          f"{mem['sqrt']['peak_bytes'] / 2**20:.1f} MB with sqrt time checkpointing: ratio {ratio:.3f}", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    mem_rows = [{"cell": "1997", "seq_len": m["seq_len"], "time_checkpoint": k, "peak_bytes": m["peak_bytes"],
                 "step_s": m["step_s"]} for k, m in mem.items()]
    fields = dict.fromkeys(k for r in rows + mem_rows for k in r)  # one header for both kinds of row
    write_csv(args.out_dir / "bench_lstm.csv", [{**dict.fromkeys(fields, ""), **r} for r in rows + mem_rows])
    command = command_line("bench_lstm.py", argv)
    header = f"`{command}` on {args.device}. {env}."
    write_table(args.out_dir / "bench_lstm.md", rows, mem, header)
    write_summary(args.out_dir / "bench_lstm_summary.md", rows, mem)
    plot(args.out_dir / "bench_lstm.png", rows)
    print(f"wrote {args.out_dir}/bench_lstm.csv, bench_lstm.md, bench_lstm.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
