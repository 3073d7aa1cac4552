"""deepres's compiled CPU kernels (deepres/models/csrc), built on first use.

PyTorch's C++ extension builder (`torch.utils.cpp_extension.load`, with ninja, as DeepSpeed builds its
ops) compiles the sources once per machine and PyTorch version into deepres's extension cache
(`$TORCH_EXTENSIONS_DIR` if set, else ~/.cache/deepres/torch_extensions/<python>_<torch>/, where
DeepSpeed's CPU ops go too); later processes load the built library in well under a second, and
processes starting together wait for one build. The first build takes 20 to 60 seconds
(`scripts/install.sh` does it).

Where no C++ compiler is found, or the build fails, deepres says so once and runs the same arithmetic
with PyTorch ops (slower, same numbers up to float rounding). `DEEPRES_CPU_KERNELS=0` skips the kernels
altogether.

Kernels: `sinkhorn_forward` / `sinkhorn_backward`, mHC's Sinkhorn–Knopp iterations on (n, n, B) float
or double logits (deepres.models.stream_mixing_ops).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger("deepres")

SOURCES = (Path(__file__).parent / "csrc" / "sinkhorn.cpp",)
ENV_SWITCH = "DEEPRES_CPU_KERNELS"

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet


def extension_cache_dir() -> Path:
    """Where JIT-compiled ops live (deepres's kernels, DeepSpeed's): one folder per Python and torch version,
    reused across runs."""
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepres" / "torch_extensions"
    torch_version = torch.__version__.replace("+", "_")
    return root / f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch_version}"


def use_persistent_extension_cache() -> str:
    """Point TORCH_EXTENSIONS_DIR at the deepres cache unless the user chose a folder; returns the folder.

    Set in the launching process, it is inherited by every rank, so a build happens once.
    """
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        os.environ["TORCH_EXTENSIONS_DIR"] = str(extension_cache_dir())
    return os.environ["TORCH_EXTENSIONS_DIR"]


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def available() -> bool:
    """True when the kernels are built and loaded (building them now if needed); False where they cannot
    be (no compiler, a failed build, or DEEPRES_CPU_KERNELS=0)."""
    global _loaded
    if _loaded is not None:
        return _loaded and enabled()
    with _lock:
        if _loaded is None:
            _loaded = enabled() and _load()
    return _loaded and enabled()


def _load() -> bool:
    try:
        # the builder's module logs "No CUDA runtime is found" at import on a CPU-only machine with a CUDA
        # build of torch: nothing a user of a CPU kernel needs to read
        builder_log = logging.getLogger("torch.utils.cpp_extension")
        level = builder_log.level
        builder_log.setLevel(logging.ERROR)
        try:
            from torch.utils import cpp_extension
        finally:
            builder_log.setLevel(level)
        _put_ninja_on_path()
        use_persistent_extension_cache()
        cpp_extension.load(name="deepres_cpu_kernels", sources=[str(s) for s in SOURCES],
                           extra_cflags=["-O3"], is_python_module=False, verbose=False)
        _register_fakes()
        return hasattr(torch.ops.deepres, "sinkhorn_forward")
    except Exception as err:  # noqa: BLE001 -- any failure to build means: run the PyTorch ops instead
        if int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            first = (str(err).strip().splitlines() or [""])[0][:200]
            log.warning("deepres: could not build its CPU kernels (%s: %s); mHC's Sinkhorn iterations run as "
                        "PyTorch ops instead (same numbers, slower on CPU). Fix: install a C++ compiler (g++ or "
                        "clang) and ninja, or set %s=0 to stop trying.", type(err).__name__, first, ENV_SWITCH)
        return False


def _register_fakes() -> None:
    """The kernels' output shapes, for torch.compile (`--model.memory.compile true`) and meta tensors: without
    them the compiler runs the C++ kernel on tensors that have no data. Each output has its logits' shape."""
    torch.library.register_fake("deepres::sinkhorn_forward")(lambda logits, iters: torch.empty_like(logits))
    torch.library.register_fake("deepres::sinkhorn_backward")(lambda grad, logits, iters: torch.empty_like(logits))


def _put_ninja_on_path() -> None:
    """The builder runs `ninja` from PATH; a virtual environment's own ninja (the `ninja` package) is not
    on it when the environment's programs are run without activating it."""
    if shutil.which("ninja"):
        return
    candidates = [Path(sys.executable).parent]
    try:
        import ninja  # the PyPI package ships the binary

        candidates.insert(0, Path(ninja.BIN_DIR))
    except ImportError:
        pass
    for folder in candidates:
        if (folder / "ninja").exists():
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            return


__all__ = ["ENV_SWITCH", "available", "enabled", "extension_cache_dir", "use_persistent_extension_cache"]
