#!/usr/bin/env bash
# Install deepres into ./.venv (created if missing).
#   scripts/install.sh          runtime + DeepSpeed
#   scripts/install.sh --dev    the same plus pytest and ruff
# torch/torchvision are pinned to builds that pip finds on this workplace's local disk
# (no multi-GB download); see the README's "Installing" section for other machines.
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

case "$(uname -m)" in
  x86_64)  torch_pins=("torch==2.14.1" "torchvision==0.29.1") ;;
  aarch64) torch_pins=("torch==2.9.1" "torchvision==0.24.1") ;;
  *)       torch_pins=("torch" "torchvision") ;;
esac
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  echo "[install] torch + torchvision (${torch_pins[*]})"
  pip install "${torch_pins[@]}"
fi
# setuptools must be in the venv: DeepSpeed's sdist is built without isolation (its setup.py
# imports torch, and an isolated build would fetch a second, multi-GB torch).
pip install "setuptools>=68" wheel
echo "[install] deepres[$extras]"
pip install --no-build-isolation -e ".[$extras]" "${torch_pins[@]}"
if [[ "${1:-}" == "--dev" ]]; then
  # DeepSpeed JIT-compiles its CPU ops on first use (~35 s); build them now into a persistent cache
  # (~/.cache/deepres/torch_extensions) so the tests do not pay for it, once per machine.
  "$VENV/bin/python" scripts/build_deepspeed_ops.py
fi
echo "[install] done: $("$VENV/bin/python" -c 'import torch, lightning; print("torch", torch.__version__, "lightning", lightning.__version__)')"
