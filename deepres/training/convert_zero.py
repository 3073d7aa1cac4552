"""`deepres convert-zero CKPT_DIR OUT`: a DeepSpeed ZeRO checkpoint directory as one plain .ckpt file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deepres.errors import ConfigError
from deepres.lightning_compat import is_deepspeed_checkpoint
from deepres.training.checkpoints import deepspeed_checkpoint_globals, load_checkpoint


def convert_zero_checkpoint(checkpoint_dir: str | Path, output_file: str | Path, *, trusted: bool = False) -> Path:
    """Write a ZeRO checkpoint directory (as Lightning's DeepSpeed strategy saves it) as one Lightning .ckpt
    with fp32 weights, loadable with `torch.load` or `LightningModule.load_from_checkpoint`, no DeepSpeed."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    checkpoint_dir, output_file = Path(checkpoint_dir), Path(output_file)
    if not checkpoint_dir.is_dir() or not is_deepspeed_checkpoint(checkpoint_dir):
        raise ConfigError(
            f"{checkpoint_dir} is not a DeepSpeed ZeRO checkpoint directory (one holding a `latest` file and a "
            "`checkpoint/` folder, e.g. runs/NAME/checkpoints/last.ckpt/ of a deepspeed_stage_* run)."
        )
    if output_file.is_dir():
        raise ConfigError(f"{output_file} is a directory; give the output file, e.g. {output_file / 'model.ckpt'}.")
    if not trusted:
        # DeepSpeed's converter unpickles every file with weights_only=False: check each one first with the
        # loader that cannot run code, so a crafted file is refused before DeepSpeed opens it.
        allow = deepspeed_checkpoint_globals()
        for file in sorted(checkpoint_dir.rglob("*.pt")):
            load_checkpoint(file, mmap=True, option="--trust (deepres convert-zero)", allow=allow)
    output_file.parent.mkdir(parents=True, exist_ok=True)
    convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir, output_file)
    return output_file


def convert_zero_main(argv: list[str] | None = None) -> int:
    """`deepres convert-zero CKPT_DIR OUT`: a ZeRO checkpoint directory -> one plain .ckpt file."""
    parser = argparse.ArgumentParser(
        prog="deepres convert-zero",
        description="Turn a DeepSpeed ZeRO checkpoint directory into one .ckpt file with fp32 weights "
        "(torch.load(OUT)['state_dict']) that loads without DeepSpeed.",
    )
    parser.add_argument("checkpoint_dir", help="the ZeRO checkpoint directory, e.g. runs/NAME/checkpoints/last.ckpt")
    parser.add_argument("output", help="the file to write, e.g. model.ckpt")
    parser.add_argument("--trust", action="store_true",
                        help="load files that need more than tensors and plain containers (only for files you trust)")
    args = parser.parse_args(argv)
    try:
        convert_zero_checkpoint(args.checkpoint_dir, args.output, trusted=args.trust)
    except ConfigError as err:
        print(f"deepres convert-zero: {err}", file=sys.stderr)
        return 2
    return 0
