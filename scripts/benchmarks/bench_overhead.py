"""Framework overhead: seconds per training step of `deepres fit` vs a hand-written PyTorch loop.

    .venv/bin/python scripts/benchmarks/bench_overhead.py             # ResNet-20 and the default job, 7 trials: ~5 min on one quiet core
    .venv/bin/python scripts/benchmarks/bench_overhead.py --quick     # smoke test

Both sides train the same network (deepres's `resnet20_cifar` on 3x32x32 images, batch 64, and the
default job's 100-layer highway_mlp on 64-feature vectors, batch 64) from the same seed, on the same
in-memory tensors (a TensorDataset of random images / the digits), with the same optimiser
(SGD, Nesterov momentum 0.9, weight decay 5e-4 on weights only, cosine lr stepped every step, torch's
fused SGD kernel on both sides, as deepres.training.optim picks it) and the
same precision (fp32). `deepres fit` is `deepres.training.cli.main(["fit", ...])` in this process,
with everything it does by default (progress bar, per-step logging of loss/accuracy/lr, CSV logger);
the hand loop is forward, cross-entropy, zero_grad, backward, step, scheduler step over a plain
`DataLoader(shuffle=True)`.

Timing: the clock is read at the start of every step (deepres: a `--trainer.callbacks` callback's
`on_train_batch_start`; hand loop: the top of the loop body), both after the batch is fetched, so the interval from step
`warmup` to step `warmup + steps` covers `steps` whole iterations (data loading, forward, backward,
optimiser, hooks, logging) and excludes setup, warm-up, validation and checkpointing (the training
set is larger than warm-up + timed steps, so no epoch ends inside the window). Each job is timed three ways: `deepres fit` as configured by default
(wandb included: offline without credentials), `deepres fit --wandb.enabled false`, and the hand loop. Trials
alternate the order of the sides so that drift in a shared machine's load hits both sides alike; the
ratio is taken per trial (each deepres side against that trial's hand loop) and summarised by its median. Writes overhead.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch.utils.data import DataLoader, TensorDataset

from deepres.data.base import DeepresDataModule

TARGET = 1.03  # deepres fit within 3 % of a hand-written loop
WEIGHT_DECAY = 5e-4
LR = 0.05
JOBS = {
    # name: (deepres fit arguments, input shape of one sample, data set size in steps)
    "resnet20_cifar": (["--model.arch", "resnet20_cifar"], (3, 32, 32)),
    "default job (highway_mlp depth 100)": ([], (64,)),
}
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import add_standard_arguments, label_trial_axes, quiet_lightning, save_figure, write_results_csv  # noqa: E402  (scripts/ is on sys.path)

from deepres.training.run_dir import environment  # noqa: E402


class InMemoryData(DeepresDataModule):
    """deepres's data path (rank-aware resumable sampler + DataLoader) over tensors already in memory."""

    tensors: tuple[torch.Tensor, torch.Tensor] | None = None  # set by the benchmark before each fit

    def __init__(self, batch_size: int = 64):
        super().__init__(batch_size, 0, 0)
        x, _ = self.tensors
        self.num_classes = 10
        self.input_shape = tuple(x.shape[1:])

    def setup(self, stage: str | None = None) -> None:
        self.train_set = TensorDataset(*self.tensors)
        self.val_set = TensorDataset(*(t[: self.batch_size] for t in self.tensors))


class StepClock(Callback):
    """Seconds from the start of training step `first` to the start of step `last`, read in
    `on_train_batch_start` (after the batch is fetched, as the hand loop's clock). Given to
    `deepres fit` as `--trainer.callbacks`; the result goes to the class attribute `seconds`, because
    jsonargparse builds the instance inside `deepres fit`."""

    seconds: list[float] = []

    def __init__(self, first: int = 0, last: int = 1):
        self.first, self.last, self.start = first, last, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first:
            self.start = time.perf_counter()
        elif trainer.global_step == self.last:
            StepClock.seconds.append(time.perf_counter() - self.start)


def make_tensors(shape: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if shape == (64,):  # the default job's digits, repeated to fill the window
        from deepres.data import DigitsDataModule

        digits = DigitsDataModule()
        digits.setup("fit")
        x, y = digits.train_set.tensors
        reps = -(-n // len(x))
        return x.repeat(reps, 1)[:n], y.repeat(reps)[:n]
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


SIDES = {  # side: extra `deepres fit` arguments (None: the hand loop)
    "deepres": [],  # everything the default job does, wandb included (offline without credentials)
    "deepres, no wandb": ["--wandb.enabled", "false"],
    "hand": None,
}


def time_deepres(job_args: list[str], args: argparse.Namespace, root: str) -> float:
    """Seconds for `args.steps` steps of `deepres fit`."""
    from deepres.training.cli import main as deepres_main

    data = {"class_path": f"{InMemoryData.__module__}.InMemoryData", "init_args": {"batch_size": args.batch_size}}
    clock = {"class_path": f"{StepClock.__module__}.StepClock",
             "init_args": {"first": args.warmup, "last": args.warmup + args.steps}}
    argv = ["fit", *job_args, "--data", json.dumps(data), "--trainer.callbacks", json.dumps([clock]),
            "--model.optim.weight_decay", str(WEIGHT_DECAY), "--model.optim.lr", str(LR),
            "--trainer.max_steps", str(args.warmup + args.steps + 1), "--trainer.max_epochs", "1",
            "--trainer.limit_val_batches", "0", "--run.root", root, "--run.name", "deepres"]
    StepClock.seconds.clear()
    with open(Path(root) / "fit.log", "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = deepres_main(argv)
    if code != 0 or len(StepClock.seconds) != 1:
        raise RuntimeError(f"deepres fit {' '.join(argv)} failed (exit {code}); see {root}/fit.log")
    return StepClock.seconds[0]


def time_hand_loop(job_args: list[str], args: argparse.Namespace) -> float:
    """Seconds for `args.steps` steps of the hand-written loop on the same network and tensors."""
    from deepres.models import create_model
    from deepres.training.optim import implementation

    arch = job_args[1] if job_args else "highway_mlp"
    x, y = InMemoryData.tensors
    overrides = {"num_classes": 10, **({"in_chans": 3} if x.ndim == 4 else {"in_features": x.shape[1]})}
    torch.manual_seed(0)
    net = create_model(arch, **overrides).train()
    decay = [p for p in net.parameters() if p.ndim > 1]  # weights only, as deepres
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    # the same optimiser implementation as deepres (torch's fused kernel where the parameters allow it)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=LR, momentum=0.9, nesterov=True, **implementation(net))
    total = args.warmup + args.steps + 1
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True, drop_last=True)
    start = 0.0
    for step, (xb, yb) in enumerate(loader):
        if step == args.warmup:
            start = time.perf_counter()
        elif step == args.warmup + args.steps:
            return time.perf_counter() - start
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    raise RuntimeError("the data set is shorter than warm-up + timed steps")


def _mean_std(ts: list[float]) -> tuple[float, float]:
    return statistics.mean(ts), statistics.stdev(ts) if len(ts) > 1 else 0.0


def profile(job: str, job_args: list[str], args: argparse.Namespace, root: str, top: int = 25) -> None:
    """Where one `deepres fit` of the job spends its time outside torch's kernels (cProfile, tottime)."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    time_deepres(job_args, args, root)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text).sort_stats("tottime")
    stats.print_stats(r"(lightning|deepres|wandb|torchmetrics|tqdm)", top)
    print(f"--- {job}: cProfile of one deepres fit (setup included), by own time ---\n{text.getvalue()}", flush=True)


def write_table(path: Path, rows: list[dict], summary: dict[str, dict], header: str) -> None:
    lines = [
        "### Framework overhead: `deepres fit` vs a hand-written PyTorch loop",
        "",
        header,
        "",
        "Seconds per training step (mean ± std over trials) and the ratio deepres ÷ hand loop (median of",
        f"per-trial ratios, range in brackets). Target ≤ {TARGET}.",
        "",
        "| job | deepres fit, ms/step | hand loop, ms/step | ratio | target | verdict |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for job, s in summary.items():
        verdict = "**met**" if s["ratio"] <= TARGET else "**not met**"
        lines.append(f"| {job} | {s['deepres'][0] * 1e3:.1f} ± {s['deepres'][1] * 1e3:.1f} | "
                     f"{s['hand'][0] * 1e3:.1f} ± {s['hand'][1] * 1e3:.1f} | {s['ratio']:.3f} "
                     f"({min(s['ratios']):.3f}–{max(s['ratios']):.3f}) | ≤ {TARGET} | {verdict} |")
    lines += ["", "Per-trial times: `docs/results/overhead.csv`.", "", "![framework overhead](results/overhead.png)", ""]
    path.write_text("\n".join(lines))


def write_summary(path: Path, summary: dict[str, dict]) -> None:
    """This result's rows of the summary table in docs/RESULTS.md (result | measured | target | paper | verdict)."""
    path.write_text("".join(
        f"| Framework overhead, {job}: `deepres fit` ÷ hand-written loop, s per step | {s['ratio']:.3f} | "
        f"≤ {TARGET} | — | {'met' if s['ratio'] <= TARGET else '**not met**'} |\n" for job, s in summary.items()))


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = list(dict.fromkeys(r["job"] for r in rows))
    fig, axes = plt.subplots(1, len(jobs), figsize=(5 * len(jobs), 3.6), squeeze=False)
    for ax, job in zip(axes[0], jobs, strict=True):
        for side, colour in zip(SIDES, ("tab:blue", "tab:orange", "tab:grey"), strict=True):
            sel = [r for r in rows if r["job"] == job and r["side"] == side]
            ax.plot([r["trial"] for r in sel], [r["ms_per_step"] for r in sel], "o-", color=colour,
                    label={"deepres": "deepres fit", "hand": "hand-written loop"}.get(side, f"{side[:7]} fit{side[7:]}"))
        ax.set_xticks(sorted({r["trial"] for r in rows}))
        label_trial_axes(ax, "trial (sides alternate within a trial)", "ms per training step", job, fontsize=10)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each trial")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per trial")
    parser.add_argument("--trials", type=int, default=7, help="trials per side, alternating")
    add_standard_arguments(parser, "2 trials of 3 steps, batch 8")
    parser.add_argument("--jobs", nargs="+", choices=["resnet20_cifar", "default"], default=["resnet20_cifar", "default"],
                        help="which jobs to time (default: both)")
    parser.add_argument("--profile", action="store_true",
                        help="also run one cProfile'd `deepres fit` per job and print where its time goes")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.trials, args.batch_size = 1, 3, 2, 8
    torch.set_num_threads(args.threads)
    env = environment(args.threads)
    print(env, flush=True)
    start = time.perf_counter()
    rows, summary = [], {}
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as root:
        for job, (job_args, shape) in JOBS.items():
            if ("default" if job.startswith("default") else job) not in args.jobs:
                continue
            InMemoryData.tensors = make_tensors(shape, (args.warmup + args.steps + 2) * args.batch_size)
            if args.profile:
                profile(job, job_args, args, root)
            times: dict[str, list[float]] = {side: [] for side in SIDES}
            for trial in range(args.trials):
                order = list(SIDES) if trial % 2 == 0 else list(reversed(SIDES))
                for side in order:
                    extra = SIDES[side]
                    t = time_hand_loop(job_args, args) if extra is None else time_deepres([*job_args, *extra], args, root)
                    times[side].append(t / args.steps)
                    rows.append({"job": job, "trial": trial + 1, "side": side, "ms_per_step": t / args.steps * 1e3})
                    print(f"{job}: trial {trial + 1} {side:17s} {t / args.steps * 1e3:8.2f} ms/step", flush=True)
            for side in SIDES:
                if side == "hand":
                    continue
                ratios = [d / h for d, h in zip(times[side], times["hand"], strict=True)]
                label = job if side == "deepres" else f"{job}, no wandb"
                summary[label] = {"deepres": _mean_std(times[side]), "hand": _mean_std(times["hand"]),
                                  "ratio": statistics.median(ratios), "ratios": ratios}
                print(f"{label}: deepres/hand = {summary[label]['ratio']:.3f} (median of {len(ratios)} trials, "
                      f"each against the hand loop of the same trial; target <= {TARGET})", flush=True)
    seconds = time.perf_counter() - start
    command = write_results_csv(args.out_dir, "overhead", rows, "bench_overhead.py", argv)
    header = (f"`{command}` — {args.trials} trials per side, alternating, each {args.steps} timed steps after "
              f"{args.warmup} warm-up steps, batch {args.batch_size}, fp32; {seconds / 60:.1f} min. {env}.")
    write_table(args.out_dir / "overhead.md", rows, summary, header)
    write_summary(args.out_dir / "overhead_summary.md", summary)
    plot(args.out_dir / "overhead.png", rows)
    print(f"wrote {args.out_dir}/overhead.csv, overhead.md, overhead.png")
    return 0


if __name__ == "__main__":
    quiet_lightning()
    sys.exit(main())
