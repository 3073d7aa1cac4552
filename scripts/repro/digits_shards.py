"""Write scikit-learn's digits as webdataset shards, for trying and measuring the shard loader without a download.

    python scripts/repro/digits_shards.py OUT        # OUT/tree (PNG files), OUT/shards (train: 5 shards, val: 1)

The 1,797 8x8 digits, upscaled to 32x32 RGB PNGs (nearest neighbour), a fixed split of 1,500 training and 297
validation images, one folder per class, converted split by split by `deepres shard --format folder --split SPLIT --shard-size 300`. Then e.g.

    deepres fit --data deepres.data.shards.ShardDataModule --data.root OUT/shards --data.image_size 32 \\
        --data.eval_resize 32 --data.recipe cifar --data.batch_size 64 --model.arch resnet20_cifar

(docs/results/chaos_resume.md uses it for the shard-fed chaos run.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def write_tree(tree: Path) -> None:
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    for split, chosen in (("train", order[:1500]), ("val", order[1500:])):
        for i in chosen:
            pixels = (digits.images[i] / 16 * 255).astype(np.uint8)
            path = tree / split / f"c{digits.target[i]}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.stack([pixels] * 3, -1)).resize((32, 32), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where tree/ and shards/ go")
    args = parser.parse_args(argv)
    write_tree(args.out / "tree")
    for split in ("train", "val"):
        command = [sys.executable, "-m", "deepres", "shard", str(args.out / "tree" / split), str(args.out / "shards"),
                   "--format", "folder", "--split", split, "--shard-size", "300"]
        if subprocess.call(command):
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
