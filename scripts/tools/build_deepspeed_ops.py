"""Compile the DeepSpeed ops a CPU run needs into deepres's persistent cache, so the first run (and CI)
does not spend 30-90 s compiling them inside a test.

    python scripts/tools/build_deepspeed_ops.py            # shared-memory all-reduce (every DeepSpeed CPU run)
    python scripts/tools/build_deepspeed_ops.py --cpu-adam # also DeepSpeedCPUAdam's kernel (≈90 s on 2 cores)

The cache is TORCH_EXTENSIONS_DIR if set, else ~/.cache/deepres/torch_extensions/<python>_<torch>/.
"""

from __future__ import annotations

import argparse
import sys
import time

from deepres.strategies import CPU_ADAM_OP, CPU_OPS, build_deepspeed_ops, use_persistent_extension_cache


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-adam", action="store_true", help="also build the op DeepSpeedCPUAdam uses")
    args = parser.parse_args(argv)
    ops = (*CPU_OPS, CPU_ADAM_OP) if args.cpu_adam else CPU_OPS
    start = time.perf_counter()
    built = build_deepspeed_ops(ops)
    print(f"[build_deepspeed_ops] {', '.join(built)} ready in {use_persistent_extension_cache()} "
          f"({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
