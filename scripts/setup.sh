#!/usr/bin/env bash
# Install tformer and its test dependencies into the current Python environment.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build first so that pip
# never pulls several GB of CUDA packages; with a GPU, pip's default (CUDA) build is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch>=2.5"
  else
    "$PY" -m pip install -q "torch==2.13.0"  # the CPU wheel; pick another CPU build if yours differs
  fi
fi
"$PY" -m pip install -q -e ".[dev]"
