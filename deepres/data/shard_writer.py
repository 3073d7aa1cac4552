"""`deepres shard`: write webdataset tar shards from an image tree or the CIFAR archive, index shards
that something else wrote, and verify either against its index.

    deepres shard ~/data/imagenet ~/data/imagenet-shards --resize 320 --workers 16
    deepres shard --index ~/data/laion-shards                       # shards written by another tool
    deepres shard --index '/data/in1k/imagenet1k-train-{0000..1023}.tar' --out /data/in1k/train.json
    deepres shard --verify ~/data/imagenet-shards

Converting writes one folder per split, each with its shards and an index.json that the loader reads;
a conversion or an indexing run that is interrupted resumes where it stopped when run again.

The work is done in `deepres.data.shard_convert` (conversion) and `deepres.data.shard_index` (indexing
and verifying), on the shard format of `deepres.data.shard_format` and the source images that
`deepres.data.image_sources` finds; none of them imports Lightning, so that `deepres shard` starts fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from deepres.data.shard_convert import DEFAULT_QUALITY, ConvertOptions, convert, parse_shard_size
from deepres.data.shard_format import INDEX_NAME, LABEL_FIELD, SampleFields
from deepres.data.shard_index import index_shards, verify
from deepres.errors import ConfigError

# ---------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepres shard",
        description="Convert an image tree or the CIFAR archive into webdataset tar shards, index shards "
        "written by another tool, or verify shards against their index.",
        epilog="Formats: imagenet = SRC/train/<class>/* and SRC/val/ (per-class folders, or flat with the "
        "devkit ground truth); folder = SRC/<class>/*; cifar = the extracted python archive.",
    )
    p.add_argument("paths", nargs="*", metavar="SRC OUT", help="source directory and output directory")
    p.add_argument("--verify", action="store_true", help="re-read the shards in OUT and check them against the index")
    p.add_argument("--decode", action="store_true", help="with --verify: also decode every image (slower)")
    p.add_argument("--index", metavar="SHARDS", help="write an index for existing webdataset shards: their "
                   "folder or a pattern ('/data/train-{000000..000146}.tar'); resumes if interrupted")
    p.add_argument("--out", type=Path, help=f"with --index: where to write the index (default: {INDEX_NAME} "
                   "beside the shards)")
    p.add_argument("--label-field", default=LABEL_FIELD, help="with --index: the field holding the label: "
                   "an extension (cls, label, txt) or json:KEY for a key of the .json sidecar")
    p.add_argument("--image-fields", default="jpg,jpeg,png,webp",
                   help="with --index: image extensions to look for, in order (comma-separated)")
    p.add_argument("--num-classes", type=int, help="with --index: number of classes when the labels are "
                   "indices and the largest class may be missing from the shards")
    p.add_argument("--format", default="auto", choices=["auto", "imagenet", "folder", "cifar"])
    p.add_argument("--split", help="imagenet/cifar: convert only this split (train or val); "
                   "folder: the split name to write (default train)")
    p.add_argument("--val-labels", type=Path, help="ground truth for a flat ImageNet val/: the devkit's "
                   "ILSVRC2012_validation_ground_truth.txt (meta.mat beside it) or LOC_val_solution.csv")
    p.add_argument("--shard-size", default="1000", help="samples per shard (1000) or bytes (256MB, 1GiB)")
    p.add_argument("--resize", type=int, help="shrink images whose shorter side is longer than this (pixels)")
    p.add_argument("--quality", type=int, help=f"re-encode every JPEG at this quality (default: keep source "
                   f"JPEG bytes, {DEFAULT_QUALITY} when an image must be re-encoded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle across classes")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes")
    p.add_argument("--overwrite", action="store_true", help="delete shards of a different earlier conversion in OUT")
    return p


def _index_main(args: argparse.Namespace) -> int:
    if args.paths:
        raise ConfigError("--index takes the shards as its own argument: deepres shard --index SHARDS [--out FILE]")
    fields = SampleFields.of([f.strip() for f in args.image_fields.split(",") if f.strip()], args.label_field)
    index = index_shards(args.index, args.out, fields, args.workers, args.num_classes)
    unusable = index["indexed"]["unusable_samples"]
    note = (f"; {unusable} samples lack an image or label and will be skipped "
            f"(e.g. {index['indexed']['first_problem']})") if unusable else ""
    print(f"{index['path']}: {len(index['shards'])} shards, {index['num_samples']} samples, "
          f"{index['num_classes']} classes{note}")
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    args = _parser().parse_args(None if argv is None else list(argv))
    try:
        if args.index is not None:
            return _index_main(args)
        if args.verify:
            if len(args.paths) != 1:
                raise ConfigError("--verify takes one directory: deepres shard --verify OUT")
            return verify(Path(args.paths[0]), args.workers, args.decode)
        if len(args.paths) != 2:
            raise ConfigError("give a source and an output directory: deepres shard SRC OUT "
                              "(or index existing shards: deepres shard --index SHARDS)")
        if args.quality is not None and not 1 <= args.quality <= 100:
            raise ConfigError(f"--quality {args.quality}: JPEG quality must be between 1 and 100.")
        if args.resize is not None and args.resize < 1:
            raise ConfigError(f"--resize {args.resize}: give the shorter side in pixels (e.g. 320).")
        opts = ConvertOptions(args.shard_size, args.resize, args.quality, args.seed, args.workers, args.overwrite)
        parse_shard_size(opts.shard_size)
        indexes = convert(Path(args.paths[0]), Path(args.paths[1]), args.format, args.split, args.val_labels, opts)
    except ConfigError as exc:
        print(f"deepres shard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepres shard: interrupted; run the same command again to resume.", file=sys.stderr)
        return 130
    for index in indexes:
        skipped = f", {len(index['skipped'])} images skipped (listed in index.json)" if index["skipped"] else ""
        print(f"{Path(args.paths[1]) / index['split']}: {len(index['shards'])} shards, "
              f"{index['num_samples']} samples, {index['num_classes']} classes{skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
