"""Does one learning rate hold from 10 to 10,000 blocks? A learning-rate × depth sweep, with and without CompleteP.

    OMP_NUM_THREADS=1 nice python scripts/repro/sweep_depth_transfer.py                      # depths 10 100 1000
    OMP_NUM_THREADS=1 nice python scripts/repro/sweep_depth_transfer.py --depths 10000 --lrs 0.02 --scalings completep
    python scripts/repro/sweep_depth_transfer.py --render-only                                # table + figure from the CSV
    python scripts/repro/sweep_depth_transfer.py --quick                                      # smoke test

For each member of the residual family (`highway_mlp`, width 50, ReLU: highway with its `auto` gate bias,
residual + ReZero, residual + LayerScale, and mhc on 4 streams), each `--model.depth_scaling` (none, completep), each depth L
(hidden layers: 1 plain layer + L − 1 blocks) and each learning rate of a log grid (factor 2 apart), one
training run on the digits with the default job's optimizer and schedule (SGD, Nesterov momentum 0.9, cosine
to 0, batch 64, no weight decay) for a fixed budget of --steps optimizer steps, one seed. The run is the
default job's training step without Lightning (the same `create_model`, `build_optimizer` with its parameter
groups, `lr_lambda` and data module), so that hundreds of short runs fit on one CPU core. Then: the final
training loss (eval mode, all 1,437 training digits) and validation accuracy (360 digits). A run whose loss
stops being finite is stopped and recorded as diverged (loss inf, accuracy of the untrained class prior).

Rows are appended to depth_transfer.csv as each run ends, and runs already in it are skipped: an interrupted
sweep resumes where it stopped. The best lr of a (member, switch, depth) is the one with the lowest final
training loss; the table compares it with depth 10's best (transfer: within a factor of 2) and the validation
accuracy at depth 10's best lr with the depth's own best accuracy (transfer: within 1 percentage point).

Runtime on one CPU core: minutes for depths 10 and 100; about 28 min for one (member, switch) learning-rate
grid at 1,000 blocks; hours for one at 10,000.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: evidence.py, the helpers the scripts share
from evidence import command_line, save_figure  # noqa: E402  (scripts/ is on sys.path)

MEMBERS: dict[str, dict] = {
    "highway": {"gate": "highway"},
    "residual + rezero": {"gate": "residual", "init": "rezero"},
    "residual + layerscale": {"gate": "residual", "init": "layerscale"},
    "mhc": {"gate": "mhc", "streams": 4},  # n = 4 streams, dynamic mixings (deepres.models.hyper)
}
MULTI_STREAM = ("mhc",)  # trained one lr at a time (train_one): stacked_forward writes out the one-stream blocks only
SCALINGS = ("none", "completep")
LRS = tuple(0.0025 * 2 ** k for k in range(10))  # 0.0025 … 1.28, factor 2 apart
FIELDS = ("member", "depth_scaling", "depth", "lr", "steps", "seed", "final_train_loss", "val_acc", "diverged_at",
          "wall_s")
REFERENCE_DEPTH = 10  # the depth whose best lr is carried to the others (the shallowest run where 10 is absent)


def _digits(seed: int):
    from deepres.data import DigitsDataModule

    data = DigitsDataModule(layout="flat", seed=seed)
    data.setup("fit")
    return data.train_set.tensors, data.val_set.tensors


def _build(member: str, scaling: str, depth: int, seed: int):
    import torch

    from deepres.models import create_model

    torch.manual_seed(seed)
    return create_model("highway_mlp", depth=depth, width=50, in_features=64, num_classes=10,
                        depth_scaling=scaling, **MEMBERS[member])


def _batches(n: int, steps: int, seed: int):
    """The indices of each step's batch of 64: a new permutation every epoch, the last partial batch dropped
    (as the job's loader)."""
    import torch

    order = torch.Generator().manual_seed(seed)
    per_epoch = n // 64
    for step in range(steps):
        if step % per_epoch == 0:
            perm = torch.randperm(n, generator=order)
        yield step, perm[(step % per_epoch) * 64:(step % per_epoch + 1) * 64]


def _row(member, scaling, depth, lr, steps, seed, train_loss, acc, diverged_at, chance, wall_s) -> dict:
    if diverged_at != "" or not math.isfinite(train_loss):
        train_loss, acc, diverged_at = math.inf, chance, steps if diverged_at == "" else diverged_at
    return {"member": member, "depth_scaling": scaling, "depth": depth, "lr": lr, "steps": steps, "seed": seed,
            "final_train_loss": train_loss, "val_acc": acc, "diverged_at": diverged_at, "wall_s": wall_s}


def train_one(member: str, scaling: str, depth: int, lr: float, steps: int, seed: int) -> dict:
    """One run of the default job's training step (its model, `build_optimizer` with its parameter groups,
    `lr_lambda`) for `steps` steps. The reference that `train_side_by_side` must match."""
    import torch
    import torch.nn.functional as F

    from deepres.training.config import OptimizerConfig, ScheduleConfig
    from deepres.training.optim import build_optimizer, lr_lambda

    start = time.perf_counter()
    (x, y), (xv, yv) = _digits(seed)
    model = _build(member, scaling, depth, seed)
    opt = build_optimizer(model, OptimizerConfig(lr=lr))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(ScheduleConfig(), total_steps=steps))
    diverged_at = ""
    model.train()
    for step, idx in _batches(len(x), steps, seed):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            diverged_at = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(x), y))
        acc = float((model(xv).argmax(1) == yv).float().mean())
    chance = float((yv == torch.bincount(y).argmax()).float().mean())
    return _row(member, scaling, depth, lr, steps, seed, train_loss, acc, diverged_at, chance,
                round(time.perf_counter() - start, 1))


def _linear(x, P, name):
    import torch

    return torch.baddbmm(P[name + ".bias"].unsqueeze(1), x, P[name + ".weight"].transpose(1, 2))


def stacked_forward(model, P: dict, x):
    """The forward of `model` (a highway_mlp of one of MEMBERS) for K stacked copies of its parameters P
    (name → [K, ...]): logits [K, B, classes]. One batched op per layer for all K copies, so that a sweep
    pays the per-op cost once per learning-rate grid instead of once per learning rate."""
    import torch
    import torch.nn.functional as F

    k = next(iter(P.values())).shape[0]
    h = F.relu(_linear(x.expand(k, *x.shape), P, "stem.0"))
    for i, block in enumerate(model.blocks):
        pre = f"blocks.{i}."
        if block.gate == "highway":
            t = torch.sigmoid(_linear(h, P, pre + "transform_gate.proj"))
            merge = h + t * (F.relu(_linear(h, P, pre + "body.0")) - h)
        else:
            if hasattr(block.body, "preact"):  # W·relu(LN(x)) + b
                width = h.shape[-1]
                z = F.layer_norm(h, (width,), eps=block.body.preact[0].eps)
                z = z * P[pre + "body.preact.0.weight"].unsqueeze(1) + P[pre + "body.preact.0.bias"].unsqueeze(1)
                branch = _linear(F.relu(z), P, pre + "body.branch")
            else:
                branch = F.relu(_linear(h, P, pre + "body.0"))
            scale = P[pre + "branch_scale.weight"]
            merge = h + branch * scale.view(k, 1, -1)
        h = merge if block.depth_multiplier == 1.0 else torch.lerp(h, merge, block.depth_multiplier)
    return _linear(h, P, "head")


def train_side_by_side(member: str, scaling: str, depth: int, lrs: list[float], steps: int, seed: int) -> list[dict]:
    """`train_one` for every lr of `lrs` at once: K copies of the same initial net (one seed) see the same
    batches; SGD with Nesterov momentum written out (torch.optim.SGD's update) with each parameter's lr
    multiplier taken from deepres.training.optim.param_groups (the depth rule). Copies are independent: a
    diverged one (non-finite loss) is frozen and recorded, the others go on."""
    import torch
    import torch.nn.functional as F

    from deepres.training.config import OptimizerConfig, ScheduleConfig
    from deepres.training.optim import lr_lambda, param_groups

    start = time.perf_counter()
    (x, y), (xv, yv) = _digits(seed)
    model = _build(member, scaling, depth, seed)
    names = {id(p): n for n, p in model.named_parameters()}
    multiplier = {names[id(p)]: g.get("lr", 1.0) for g in param_groups(model, 0.0, optimizer="sgd", lr=1.0)
                  for p in g["params"]}
    k = len(lrs)
    P = {n: p.detach().unsqueeze(0).repeat(k, *([1] * p.ndim)).requires_grad_() for n, p in model.named_parameters()}
    momentum = OptimizerConfig().momentum
    factor = lr_lambda(ScheduleConfig(), total_steps=steps)
    base = torch.tensor(lrs)
    alive = torch.ones(k, dtype=torch.bool)
    diverged_at: list = [""] * k
    buffers: dict = {}
    for step, idx in _batches(len(x), steps, seed):
        losses = F.cross_entropy(stacked_forward(model, P, x[idx]).flatten(0, 1), y[idx].repeat(k),
                                 reduction="none").view(k, -1).mean(1)
        for j in torch.nonzero(alive & ~torch.isfinite(losses)).flatten().tolist():
            alive[j], diverged_at[j] = False, step
        if not alive.any():
            break
        grads = torch.autograd.grad(losses.sum(), list(P.values()))
        lr_now = torch.where(alive, base, torch.zeros(())) * factor(step)
        with torch.no_grad():
            for (n, p), g in zip(P.items(), grads, strict=True):
                g = torch.nan_to_num(g) * alive.view(k, *([1] * (g.ndim - 1)))
                buf = buffers.get(n)
                buffers[n] = buf = g.clone() if buf is None else buf.mul_(momentum).add_(g)
                p.sub_((g + momentum * buf) * (lr_now * multiplier[n]).view(k, *([1] * (g.ndim - 1))))
    with torch.no_grad():
        train_losses = F.cross_entropy(stacked_forward(model, P, x).flatten(0, 1), y.repeat(k),
                                       reduction="none").view(k, -1).mean(1)
        accs = (stacked_forward(model, P, xv).argmax(-1) == yv).float().mean(1)
    chance = float((yv == torch.bincount(y).argmax()).float().mean())
    wall = round((time.perf_counter() - start) / k, 1)
    return [_row(member, scaling, depth, lr, steps, seed, float(train_losses[j]), float(accs[j]),
                 diverged_at[j], chance, wall) for j, lr in enumerate(lrs)]


def key(row: dict) -> tuple:
    return (row["member"], row["depth_scaling"], int(row["depth"]), f"{float(row['lr']):.6g}", int(row["steps"]),
            int(row["seed"]))


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = list({key(r): r for r in csv.DictReader(path.open())}.values())  # a rerun row replaces an older one
    for r in rows:
        r["depth"], r["steps"], r["seed"] = int(r["depth"]), int(r["steps"]), int(r["seed"])
        r["lr"], r["final_train_loss"], r["val_acc"], r["wall_s"] = (
            float(r["lr"]), float(r["final_train_loss"]), float(r["val_acc"]), float(r["wall_s"]))
    return rows


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


# ------------------------------------------------------------------------------------------------ analysis
def best(rows: list[dict]) -> dict | None:
    """The run with the lowest final training loss (ties: the larger accuracy, then the smaller lr)."""
    finite = [r for r in rows if math.isfinite(r["final_train_loss"])]
    return min(finite, key=lambda r: (r["final_train_loss"], -r["val_acc"], r["lr"])) if finite else None


def transfer(rows: list[dict]) -> list[dict]:
    """Per (member, switch, depth): the best lr, its ratio to depth 10's best, the accuracy at depth 10's best lr
    and the depth's own best accuracy."""
    out = []
    depths = {r["depth"] for r in rows}
    reference = REFERENCE_DEPTH if REFERENCE_DEPTH in depths else min(depths)
    for member in MEMBERS:
        for scaling in SCALINGS:
            sel = [r for r in rows if r["member"] == member and r["depth_scaling"] == scaling]
            ref = best([r for r in sel if r["depth"] == reference])
            for depth in sorted({r["depth"] for r in sel}):
                at = [r for r in sel if r["depth"] == depth]
                b = best(at)
                row = {"member": member, "depth_scaling": scaling, "depth": depth, "lrs": len(at),
                       "best_lr": b["lr"] if b else None, "best_loss": b["final_train_loss"] if b else None,
                       "best_acc": max(r["val_acc"] for r in at), "ref_lr": ref["lr"] if ref else None,
                       "acc_at_ref_lr": None, "lr_ratio": None, "reference": reference}
                at_ref = [r for r in at if ref and math.isclose(r["lr"], ref["lr"])]
                if at_ref:
                    row["acc_at_ref_lr"] = at_ref[0]["val_acc"]
                if b and ref:
                    row["lr_ratio"] = b["lr"] / ref["lr"]
                out.append(row)
    return out


def verdict(row: dict) -> str:
    if row["lr_ratio"] is None or row["acc_at_ref_lr"] is None:
        return "–"
    lr_ok = 0.5 - 1e-9 <= row["lr_ratio"] <= 2 + 1e-9
    acc_ok = row["best_acc"] - row["acc_at_ref_lr"] <= 0.01 + 1e-9
    return "yes" if lr_ok and acc_ok else f"no ({'lr' if not lr_ok else ''}{' ' if not (lr_ok or acc_ok) else ''}{'acc' if not acc_ok else ''})"


def write_table(path: Path, rows: list[dict], header: str) -> None:
    steps = sorted({r["steps"] for r in rows})
    lines = ["### One learning rate for every depth? CompleteP on the residual family", "", header, "",
             f"`highway_mlp` (width 50, ReLU) on the digits, {'/'.join(map(str, steps))} SGD steps of batch 64 per run "
             "(Nesterov 0.9, cosine to 0, no weight decay: the default job's optimizer), one seed, learning rates "
             f"{', '.join(f'{lr:g}' for lr in sorted({r['lr'] for r in rows}))}. `completep`: `--model.depth_scaling "
             "completep` (each block's change × 1/L, hidden learning rates × L: docs/science.md#depth-parameterisation-completep). "
             "Best lr = lowest final training loss. Transfers = best lr within a factor of 2 of depth 10's and the "
             "validation accuracy at depth 10's best lr within 1 point of the depth's best.", "",
             "| member | depth_scaling | L | lrs run | best lr (÷ L = 10's) | final train loss at best | val acc at L = 10's best lr | best val acc | transfers |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for t in transfer(rows):
        best_lr = "all diverged" if t["best_lr"] is None else f"{t['best_lr']:g}" + (
            f" (× {t['lr_ratio']:.3g})" if t["lr_ratio"] is not None else "")
        acc_ref = "–" if t["acc_at_ref_lr"] is None else f"{100 * t['acc_at_ref_lr']:.1f} %"
        loss = "–" if t["best_loss"] is None else f"{t['best_loss']:.3f}"
        lines.append(f"| {t['member']} | {t['depth_scaling']} | {t['depth']} | {t['lrs']} | {best_lr} | {loss} | {acc_ref} | "
                     f"{100 * t['best_acc']:.1f} % | {'reference' if t['depth'] == t['reference'] else verdict(t)} |")
    lines += ["", "Every run (loss inf = diverged): `docs/results/depth_transfer.csv`.", "",
              "![learning-rate transfer across depth](results/depth_transfer.png)", ""]
    path.write_text("\n".join(lines))


def write_summary(path: Path, rows: list[dict]) -> None:
    lines = []
    table = [t for t in transfer(rows) if t["depth"] != t["reference"] and verdict(t) != "–"]
    for scaling in SCALINGS:
        sel = [t for t in table if t["depth_scaling"] == scaling]
        if not sel:
            continue
        held = [t for t in sel if verdict(t) == "yes"]
        deepest = max(t["depth"] for t in sel)
        lines.append(f"| Depth-{sel[0]['reference']} lr transfers (best lr ×½–2, acc within 1 pt), depth_scaling={scaling}, "
                     f"L up to {deepest} | {len(held)} of {len(sel)} (member, depth) pairs | "
                     + ("the comparison | – | – |" if scaling == "none" else
                        f"all | CompleteP: depth-wise HP transfer | {'met' if len(held) == len(sel) else '**not met**'} |"))
    path.write_text("\n".join(lines) + ("\n" if lines else ""))


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, len(MEMBERS), figsize=(5 * len(MEMBERS), 14), squeeze=False)
    depths = sorted({r["depth"] for r in rows})
    colors = {d: plt.cm.viridis(i / max(len(depths) - 1, 1)) for i, d in enumerate(depths)}
    for col, member in enumerate(MEMBERS):
        for k, scaling in enumerate(SCALINGS):
            loss_ax, acc_ax = axes[2 * k, col], axes[2 * k + 1, col]
            for d in depths:
                sel = sorted((r for r in rows if r["member"] == member and r["depth_scaling"] == scaling
                              and r["depth"] == d), key=lambda r: r["lr"])
                if not sel:
                    continue
                lrs = [r["lr"] for r in sel]
                loss_ax.plot(lrs, [r["final_train_loss"] if math.isfinite(r["final_train_loss"]) else float("nan")
                                   for r in sel], marker="o", color=colors[d], label=f"L = {d}")
                acc_ax.plot(lrs, [100 * r["val_acc"] for r in sel], marker="o", color=colors[d], label=f"L = {d}")
            loss_ax.set_yscale("log")
            loss_ax.set_ylabel("final training loss")
            acc_ax.set_ylabel("validation accuracy (%)")
            for ax in (loss_ax, acc_ax):
                ax.set_xscale("log")
                ax.set_xlabel("learning rate")
                ax.set_title(f"{member}, depth_scaling={scaling}", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
            if loss_ax.lines:
                loss_ax.legend(fontsize=7)
    fig.suptitle("Learning rate against depth on the digits: does the best lr move? (missing points: diverged)")
    save_figure(fig, path)


def render(out_dir: Path, header: str) -> None:
    rows = read_rows(out_dir / "depth_transfer.csv")
    if not rows:
        return
    write_table(out_dir / "depth_transfer.md", rows, header)
    write_summary(out_dir / "depth_transfer_summary.md", rows)
    plot(out_dir / "depth_transfer.png", rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--members", nargs="+", default=list(MEMBERS), choices=list(MEMBERS))
    parser.add_argument("--scalings", nargs="+", default=list(SCALINGS), choices=list(SCALINGS))
    parser.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per run (the default job: 330)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("docs/results"))
    parser.add_argument("--quick", action="store_true", help="smoke test: depths 3 and 6, two lrs, 4 steps")
    parser.add_argument("--render-only", action="store_true", help="rewrite the table, summary and figure from the CSV")
    args = parser.parse_args(argv)
    import torch

    from deepres.training.run_dir import environment

    torch.set_num_threads(1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    header_path = args.out_dir / "depth_transfer.md"
    if args.render_only:
        old = header_path.read_text().splitlines() if header_path.exists() else []
        render(args.out_dir, old[2] if len(old) > 2 else f"`{command_line('sweep_depth_transfer.py', argv)}`")
        return 0
    if args.quick:
        args.depths, args.lrs, args.steps = [3, 6], [0.01, 0.1], 4
        if args.members == list(MEMBERS):  # not chosen on the command line
            args.members = ["highway", "residual + rezero"]
    env = environment(1)
    print(env, flush=True)
    csv_path = args.out_dir / "depth_transfer.csv"
    done = {key(r) for r in read_rows(csv_path)}
    start = time.perf_counter()
    for depth in args.depths:
        for member in args.members:
            for scaling in args.scalings:
                todo = [lr for lr in args.lrs if key({"member": member, "depth_scaling": scaling, "depth": depth,
                                                      "lr": lr, "steps": args.steps, "seed": args.seed}) not in done]
                if not todo:
                    continue
                if member in MULTI_STREAM:
                    rows = (train_one(member, scaling, depth, lr, args.steps, args.seed) for lr in todo)
                else:
                    rows = train_side_by_side(member, scaling, depth, todo, args.steps, args.seed)
                for row in rows:
                    append_row(csv_path, row)
                    print(row, flush=True)
    header = (f"`{command_line('sweep_depth_transfer.py', argv)}` (last invocation; runs accumulate in the CSV) — "
              f"{time.perf_counter() - start:.0f} s. {env}.")
    render(args.out_dir, header)
    print(f"wrote {csv_path}, depth_transfer.md, depth_transfer.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
