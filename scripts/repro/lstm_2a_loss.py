"""Why Exp. 2a stays unsolved in repro_lstm_1997.py: the same net and task under different losses.

    OMP_NUM_THREADS=1 python scripts/repro/lstm_2a_loss.py            # p = 10, the four variants (about 1 CPU minute)
    OMP_NUM_THREADS=1 python scripts/repro/lstm_2a_loss.py --p 100 --batches 800 --variants per-step@1e-2

Exp. 2a (Hochreiter & Schmidhuber 1997, Sec. 5.2): (c, a1 ... a_{p-1}, c), next-symbol prediction at every
step; only the last symbol needs the first one. The net of repro_lstm_1997.py's 1999-auto cell (forget bias ln p + 1,
hidden 32, a head on the cell outputs plus a direct input-to-output connection), Adam, batches of 32,
gradient clipping 1.0. Variants (`name@lr`, default lr 1e-3):

    per-step     the mean cross-entropy over all p steps (what repro_lstm_1997.py trains)
    last-only    the cross-entropy of the last step alone
    last-x-p     all steps, the last weighted p times as much as each other

Printed per variant: the mean probability of the right last symbol (chance: 0.5) and of the right symbol at the
other steps, on the last training batch. docs/RESULTS.md quotes them.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import repro_lstm_1997 as repro  # noqa: E402  (this folder's script: the row's data and net)

VARIANTS = ("per-step", "last-only", "last-x-p", "per-step@1e-2")


def run(variant: str, p: int, batches: int, seed: int = 0) -> tuple[float, float]:
    name, _, lr = variant.partition("@")
    row = repro.exp2_row("2a", p)
    torch.manual_seed(seed)
    net = repro.Net("1999", row.features, 32, row.outputs, True, None, math.log(p) + 1)
    optimizer = torch.optim.Adam(net.parameters(), lr=float(lr or 1e-3))
    g = torch.Generator().manual_seed(1 + seed)
    for _ in range(batches):
        x, target, _ = row.draw(32, g)
        logits = net(x)
        per_step = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (batch, p)
        if name == "last-only":
            loss = per_step[:, -1].mean()
        elif name == "last-x-p":
            loss = torch.cat([per_step[:, :-1], p * per_step[:, -1:]], dim=1).mean()
        else:
            loss = per_step.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
    right = logits.detach().softmax(-1).gather(2, target[..., None]).squeeze(-1)
    return float(right[:, -1].mean()), float(right[:, :-1].mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=int, default=10)
    parser.add_argument("--batches", type=int, default=600)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    for variant in args.variants:
        last, others = run(variant, args.p, args.batches)
        print(f"p = {args.p}, {args.batches} batches, {variant}: last symbol {last:.3f}, other steps {others:.3f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
