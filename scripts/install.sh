#!/usr/bin/env bash
# Install deepres from this checkout (editable) into ./.venv, created if missing.
#   scripts/install.sh          runtime + DeepSpeed
#   scripts/install.sh --dev    the same plus pytest, ruff and mkdocs, and DeepSpeed's CPU ops built once
# A torch that the venv already has (a cluster's CUDA build, a container's) is kept. Otherwise torch and
# torchvision are installed at the versions the test suite runs on (x86_64: 2.14.1 / 0.29.1; aarch64:
# 2.9.1 / 0.24.1, CPU wheels); TORCH_PINS="torch==X torchvision==Y" chooses others, e.g. the build for
# your CUDA version. Without this script: `pip install "deepres[deepspeed]"` (README, "Install").
#   PYTHON=python3.12 DEEPRES_VENV=~/venvs/deepres scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."

extras="deepspeed"
[[ "${1:-}" == "--dev" ]] && extras="deepspeed,dev"
PY=${PYTHON:-python3}
VENV=${DEEPRES_VENV:-.venv}

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if [[ -n "${TORCH_PINS:-}" ]]; then
  read -r -a torch_pins <<< "$TORCH_PINS"
else
  case "$(uname -m)" in
    x86_64)  torch_pins=("torch==2.14.1" "torchvision==0.29.1") ;;
    aarch64) torch_pins=("torch==2.9.1" "torchvision==0.24.1") ;;
    *)       torch_pins=("torch" "torchvision") ;;
  esac
fi
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "[install] torch + torchvision (${torch_pins[*]})"
  pip install "${torch_pins[@]}"
fi
# setuptools must be in the venv: DeepSpeed's sdist is built without isolation (its setup.py
# imports torch, and an isolated build would fetch a second, multi-GB torch).
pip install "setuptools>=68" wheel
echo "[install] deepres[$extras]"
# the torch already in the venv is a constraint, so that resolving deepres's requirements never swaps it
installed_torch=$("$VENV/bin/python" -c 'import torch, torchvision; v = lambda m: m.__version__.split("+")[0]; print(f"torch=={v(torch)} torchvision=={v(torchvision)}")')
read -r -a keep <<< "$installed_torch"
pip install --no-build-isolation -e ".[$extras]" "${keep[@]}"
if [[ "${1:-}" == "--dev" ]]; then
  # DeepSpeed JIT-compiles its CPU ops on first use (~35 s); build them now into a persistent cache
  # (~/.cache/deepres/torch_extensions) so the tests do not pay for it, once per machine.
  "$VENV/bin/python" scripts/tools/build_deepspeed_ops.py
fi
# deepres's CPU kernels (mHC's Sinkhorn iterations) compile on first use (20-60 s); build them now into
# the same cache, so that no run waits for the compiler. Without a C++ compiler this says so, and deepres
# runs the same arithmetic as PyTorch ops.
"$VENV/bin/python" -c 'import logging; logging.basicConfig(format="%(message)s")
from deepres.models import cpu_kernels
print("[install] deepres CPU kernels:", "built" if cpu_kernels.available() else "not built (PyTorch ops instead)")'
echo "[install] done: $("$VENV/bin/python" -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__)')"
