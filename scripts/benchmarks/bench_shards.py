"""Images/s of deepres's shard pipeline against a decode-only ceiling and torchvision's ImageFolder.

    python scripts/benchmarks/bench_shards.py                      # 1600 generated 500x375 JPEGs, 2 workers, 3 trials
                                                                   # (runtime not recorded; scripts/tools/make_results.sh runs
                                                                   # it with --images 3200 --trials 5)
    python scripts/benchmarks/bench_shards.py --workers 8 --images 8000 --dir /tmp/bench

On the same generated JPEGs and with the same number of worker processes:
  (a) ceiling: each process decodes and augments its share of the images, held in memory, in a tight
      loop (no data loader, no batching, no inter-process transfer);
  (b) deepres: ShardDataModule.train_dataloader() over shards written by `deepres shard`;
  (c) ImageFolder: torchvision's ImageFolder + DataLoader over the JPEG files.
All three run the same per-image work (deepres.data.shards.ImageTransform: JPEG decode, random-resized
crop to 224, flip, uint8 tensor); normalisation happens on the device in training and is not timed.
For reference, (c*) is ImageFolder as usually written (PIL loader, ToTensor + Normalize in the workers).
Timing starts at the first batch (worker start-up and warm-up excluded); each trial runs a, b, c in turn.
On a shared machine wall-clock rates move with the load, so the CPU seconds that all processes of a run
spent per image (start-up included) are reported as well, counted over the whole process tree: this
process, its children, and the children of its children (deepres's data-loader workers are children
of the fork server, not of this process, so getrusage(RUSAGE_CHILDREN) alone would miss them).
`--tar-reader both` adds (b') and (b'') with webdataset's own tar reader in place of deepres's:
the end-to-end figure behind the choice made in deepres.data.shard_format.iter_tar.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import command_line, write_csv  # noqa: E402  (scripts/ is on sys.path)
from PIL import Image, features
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from deepres.data import shard_writer
from deepres.data.shards import ImageTransform, ShardDataModule
from deepres.training.run_dir import environment

WDS = "b'"  # the shard loader with webdataset's tar reader


def make_images(root: Path, n: int, classes: int, size: tuple[int, int], seed: int = 0) -> None:
    """Photo-like JPEGs (smooth colour fields from upsampled noise, quality 90), about ImageNet's size."""
    rng = np.random.default_rng(seed)
    w, h = size
    for i in range(n):
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8))
        low.resize((w, h), Image.Resampling.BICUBIC).save(folder / f"img{i:06d}.JPEG", quality=90)


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _ceiling_worker(args: tuple[list[str], int]) -> tuple[int, float]:
    paths, warmup = args
    torch.set_num_threads(1)  # as in DataLoader workers
    transform = ImageTransform(True, 224, 256, "imagenet")
    images = [_read_bytes(p) for p in paths]
    for data in images[:warmup]:
        transform(data)
    start = time.perf_counter()
    for data in images[warmup:]:
        transform(data)
    return len(images) - warmup, time.perf_counter() - start


def _proc_cpu(pid: int) -> tuple[int, float]:
    """(parent pid, CPU seconds of the process plus its reaped children) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    ppid, ticks = int(fields[1]), sum(int(v) for v in fields[11:15])  # utime stime cutime cstime
    return ppid, ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """CPU time of this process, its reaped children, and every live descendant with its reaped children.

    A data-loader worker started by a fork server is a child of that server: when it exits, the server
    reaps it and its time moves into the server's cutime/cstime, which /proc shows. Summing each live
    descendant's own and reaped-children time therefore counts every worker exactly once."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
    parents: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = _proc_cpu(int(entry))
            except (OSError, ValueError):  # exited while we looked
                continue
    descendants, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, (ppid, _) in parents.items() if ppid in frontier} - descendants
        descendants |= frontier
    return total + sum(parents[pid][1] for pid in descendants)


def ceiling(files: list[str], workers: int, batch_size: int) -> tuple[float, int]:
    chunks = [(files[i::workers], batch_size) for i in range(workers)]
    with mp.get_context("fork").Pool(workers) as pool:
        results = pool.map(_ceiling_worker, chunks)
    return sum(n for n, _ in results) / max(t for _, t in results), len(files)


def loader_rate(loader) -> tuple[float, int]:
    """Images/s from the first batch to the last (start-up and the first batch excluded), images read."""
    batches = iter(loader)
    first = len(next(batches)[1])
    start, n = time.perf_counter(), 0
    for _, labels in batches:
        n += len(labels)
    return n / (time.perf_counter() - start), first + n


def shard_rate(shards: Path, workers: int, batch_size: int, tar_reader: str = "deepres") -> tuple[float, int]:
    dm = ShardDataModule(root=str(shards), batch_size=batch_size, num_workers=workers, image_size=224)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.stream.tar_reader = tar_reader  # deepres.data.shard_format.TAR_READERS
    return loader_rate(loader)


def imagefolder_rate(folder: Path, workers: int, batch_size: int, stock: bool) -> tuple[float, int]:
    if stock:
        normalize = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), normalize])
        dataset = datasets.ImageFolder(str(folder), transform=tf)
    else:
        dataset = datasets.ImageFolder(str(folder), loader=_read_bytes,
                                       transform=ImageTransform(True, 224, 256, "imagenet"))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True)
    return loader_rate(loader)


def describe_machine() -> str:
    jpeg = f"libjpeg-turbo {features.version('jpg')}" if features.check_feature("libjpeg_turbo") else \
        f"libjpeg {features.version('jpg')}"
    return environment(torch.get_num_threads(), ("torchvision", "webdataset", "pillow")) + f" ({jpeg})"


def _mean_std(xs: list[float], digits: int = 1) -> str:
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):7.{digits}f} ± {std:5.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1600)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--size", default="500x375", help="WxH of the generated JPEGs (ImageNet's mean is ~400x350)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--dir", type=Path, help="where to put the images and shards (default: a temporary folder)")
    p.add_argument("--out-dir", type=Path, help="also write shards.csv, shards.md and shards_summary.md here")
    p.add_argument("--tar-reader", choices=["deepres", "both"], default="deepres",
                   help="both: also run (b) with webdataset's tar reader, as (b')")
    args = p.parse_args(argv)
    args.argv = argv
    w, h = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or Path(tmp)
        folder, shards = root / "images", root / "shards"
        if not folder.exists():
            make_images(folder, args.images, args.classes, (w, h))
        if not (shards / "train" / "index.json").exists():
            shard_writer.main([str(folder), str(shards), "--split", "train", "--workers", str(args.workers)])
        files = sorted(str(f) for f in folder.glob("*/*.JPEG"))
        mean_kb = sum(os.path.getsize(f) for f in files) / len(files) / 1024
        machine = describe_machine()
        data_line = (f"data: {len(files)} JPEGs of {w}x{h} ({mean_kb:.0f} KiB on average), {args.classes} classes; "
                     f"workers {args.workers}, batch {args.batch_size}, {args.trials} trials after one warm-up round")
        print(machine)
        print(data_line)

        runs = {
            "a": lambda: ceiling(files, args.workers, args.batch_size),
            "b": lambda: shard_rate(shards, args.workers, args.batch_size),
            **({"b'": lambda: shard_rate(shards, args.workers, args.batch_size, "webdataset")}
               if args.tar_reader == "both" else {}),
            "c": lambda: imagefolder_rate(folder, args.workers, args.batch_size, stock=False),
            "c*": lambda: imagefolder_rate(folder, args.workers, args.batch_size, stock=True),
        }
        for run in runs.values():  # warm-up: page cache, imports, first fork
            run()
        rates: dict[str, list[float]] = {k: [] for k in runs}
        cpu_ms: dict[str, list[float]] = {k: [] for k in runs}
        for trial in range(args.trials):
            for key, run in runs.items():
                before = cpu_seconds()
                rate, images = run()
                rates[key].append(rate)
                cpu_ms[key].append(1000 * (cpu_seconds() - before) / images)
            print(f"trial {trial + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()))

    names = {"a": "ceiling: decode + augment loop", "b": "deepres shards (ShardDataModule)",
             WDS: "deepres shards, webdataset's tar reader",
             "c": "torchvision ImageFolder + DataLoader", "c*": "ImageFolder, usual PIL/ToTensor/Normalize"}
    names = {k: v for k, v in names.items() if k in runs}
    print("\n     (mean ± std over trials)                         images/s     CPU ms/image")
    for key, name in names.items():
        print(f"  ({key:2s}) {name:44s} {_mean_std(rates[key])}   {_mean_std(cpu_ms[key], 2)}")
    # ratios of runs that were adjacent in one trial (robust to load that drifts between trials): median, range
    pairs = [("b", "a", 0.9), ("b", "c", 1.0), ("b", "c*", None)] + ([("b", WDS, None)] if WDS in runs else [])
    summary = {}
    for label, per_trial in (("images/s", rates), ("CPU efficiency", {k: [1 / x for x in v] for k, v in cpu_ms.items()})):
        for num, den, target in pairs:
            ratios = [x / y for x, y in zip(per_trial[num], per_trial[den], strict=True)]
            summary[(label, num, den)] = (statistics.median(ratios), min(ratios), max(ratios), target)
        print(f"{label:15s} " + "   ".join(
            f"{num}/{den} = {summary[(label, num, den)][0]:.3f}" + (f" (target >= {t})" if t else "")
            for num, den, t in pairs))
    if args.out_dir is not None:
        write_results(args, names, rates, cpu_ms, summary, machine, data_line)
    return 0


def write_results(args, names, rates, cpu_ms, summary, machine: str, data_line: str) -> None:
    """shards.csv (every trial), shards.md (the section of docs/RESULTS.md), shards_summary.md (its rows)."""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"trial": t + 1, "run": k, "name": names[k], "images_per_s": round(rates[k][t], 2),
             "cpu_ms_per_image": round(cpu_ms[k][t], 4)} for t in range(args.trials) for k in names]
    write_csv(args.out_dir / "shards.csv", rows)
    table = "\n".join(f"| ({k}) {names[k]} | {_mean_std(rates[k])} | {_mean_std(cpu_ms[k], 2)} |" for k in names)

    def ratio(label: str, num: str, den: str) -> str:
        med, lo, hi, _ = summary[(label, num, den)]
        return f"{med:.3f} ({lo:.3f}–{hi:.3f})"

    def verdict(label: str, num: str, den: str) -> str:
        med, _, _, target = summary[(label, num, den)]
        return "met" if med >= target else "**not met**"

    lines = [f"| {label}: {num} ÷ {den} | {ratio(label, num, den)} | ≥ {t} | {verdict(label, num, den)} |"
             for label in ("images/s", "CPU efficiency") for num, den, t in (("b", "a", 0.9), ("b", "c", 1.0))]
    extra = [f"| {label}: b ÷ {den} | {ratio(label, 'b', den)} | — | — |"
             for label in ("images/s", "CPU efficiency") for den in ("c*", WDS) if (label, "b", den) in summary]
    (args.out_dir / "shards.md").write_text(f"""### Shard loader: images/s against the decode ceiling and ImageFolder

`{command_line("bench_shards.py", args.argv)}` — {machine}. {data_line}.

All runs do the same per-image work (JPEG decode, random-resized crop to 224, flip, uint8 tensor)
with the same number of worker processes: (a) each process decodes its share from memory in a tight
loop; (b) `ShardDataModule.train_dataloader()` over the same images in shards; (c) torchvision's
ImageFolder + DataLoader over the files. Images/s from the first batch to the last; CPU per image
over every process of the run (workers included, start-up included). Ratios: median over trials of
runs adjacent in one trial (range in brackets).

| run | images/s | CPU ms/image |
| --- | ---: | ---: |
{table}

| ratio | measured | target | verdict |
| --- | ---: | ---: | --- |
{chr(10).join(lines + extra)}

Per-trial numbers: `docs/results/shards.csv`.
""")
    (args.out_dir / "shards_summary.md").write_text("".join(
        f"| Shard loader, {label}: deepres shards ÷ {'decode ceiling' if den == 'a' else 'ImageFolder'} | "
        f"{ratio(label, 'b', den)} | ≥ {t} | — | {verdict(label, 'b', den)} |\n"
        for label in ("images/s", "CPU efficiency") for _, den, t in (("b", "a", 0.9), ("b", "c", 1.0))))
    print(f"wrote {args.out_dir}/shards.csv, shards.md, shards_summary.md")


if __name__ == "__main__":
    sys.exit(main())
