"""Reconstruction error of reversible Highway MLPs in float32, at init and after training steps.

    python scripts/benchmarks/bench_reversible.py                    # 1,000 and 10,000 blocks (~5 min on 2 cores)
    python scripts/benchmarks/bench_reversible.py --depths 1000 --steps 20

For each depth: build `highway_mlp(reversible=True)` (every block a reversible coupling), take a
batch of random inputs x, run the block stack forward in float32 to y and invert it back block by
block (what backward does) to x̂, and report the relative error ‖x̂ − x‖ / ‖x‖ and the largest
per-element error, at init and after SGD steps with a large learning rate on random labels (so the
gates move away from their init). The per-block amplification bound is 1 / min carry: printed with
the smallest carry weight seen, and the float64 reconstruction error as the exact reference. Also:
the relative difference of the float32 parameter gradients from those of the same net storing its
activations (ordinary autograd), the end-to-end cost of the reconstruction on training.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from deepres.models import create_model
from deepres.models.reversible import ReversibleBlock


def min_carry(net, x) -> float:
    """Smallest carry weight any coupling applies on this input (1 for residual couplings)."""
    lowest = 1.0
    with torch.no_grad():
        x1, x2 = x.chunk(2, dim=1)
        for block in net.blocks:
            assert isinstance(block, ReversibleBlock)
            c, s = block.f(x2)
            if c is not None:
                lowest = min(lowest, c.min().item())
            x1 = (c * x1 if c is not None else x1) + s
            c, s = block.g(x1)
            if c is not None:
                lowest = min(lowest, c.min().item())
            x2 = (c * x2 if c is not None else x2) + s
    return lowest


def reconstruction(net, x) -> tuple[float, float]:
    with torch.no_grad():
        y = net.blocks(x)
        back = net.blocks.inverse(y)
    return ((back - x).norm() / x.norm()).item(), (back - x).abs().max().item()


def grad_difference(net, x, labels) -> float:
    stored = copy.deepcopy(net)
    stored.blocks.store_activations = True
    grads = []
    for model in (net, stored):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), labels).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    net.zero_grad()
    return ((grads[0] - grads[1]).norm() / grads[1].norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[1000, 10000], help="reversible blocks")
    p.add_argument("--gates", nargs="+", default=["highway", "residual", "gated"])
    p.add_argument("--width", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="SGD steps between the two measurements")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# torch {torch.__version__}, threads {args.threads}, load average {os.getloadavg()[0]:.1f}; "
          f"width {args.width}, batch {args.batch}, {args.steps} SGD steps (lr {args.lr}, momentum 0.9, random labels)")
    print("| gate | blocks | when | float32 ‖x̂ − x‖/‖x‖ | float32 max abs error | float64 ‖x̂ − x‖/‖x‖ | "
          "min carry | grad rel. diff vs stored |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for gate in args.gates:
        for depth in args.depths:
            torch.manual_seed(0)
            net = create_model("highway_mlp", depth=depth + 1, width=args.width, in_features=args.width,
                               gate=gate, reversible=True)
            x = torch.randn(args.batch, args.width)
            labels = torch.randint(0, 10, (args.batch,))
            opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
            for when in ("init", f"after {args.steps} steps"):
                if when != "init":
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        opt.zero_grad()
                        torch.nn.functional.cross_entropy(net(torch.randn_like(x)), labels).backward()
                        opt.step()
                    when += f" ({time.perf_counter() - start:.0f} s)"
                h = net.stem(x)
                rel, worst = reconstruction(net, h)
                rel64, _ = reconstruction(copy.deepcopy(net).double(), h.double())
                diff = grad_difference(net, x, labels)
                print(f"| {gate} | {depth} | {when} | {rel:.2e} | {worst:.2e} | {rel64:.2e} | {min_carry(net, h):.3f} | "
                      f"{diff:.2e} |", flush=True)


if __name__ == "__main__":
    main()
