#!/usr/bin/env bash
# Install tformer (what `tformer` itself needs, e.g. for `python3 -m tformer demo`) into the current
# Python environment. `--dev` (or TFORMER_DEV=1) also installs the test dependencies
# (pytest, hypothesis, transformers, sacrebleu, captum, peft, onnx + onnxruntime, Flower, the MiniLM
# weights); scripts/test.sh does that.
# On a machine without an NVIDIA GPU, torch is pinned to the CPU build first so that pip
# never pulls several GB of CUDA packages; with a GPU, pip's default (CUDA) build is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TARGET="."
if [ "${TFORMER_DEV:-0}" = 1 ]; then TARGET=".[dev]"; fi
for arg in "$@"; do
  case "$arg" in
    --dev) TARGET=".[dev]" ;;
    *) echo "usage: bash scripts/setup.sh [--dev]" >&2; exit 2 ;;
  esac
done
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "$PY" -m pip install -q "torch>=2.5"
  else
    "$PY" -m pip install -q "torch==2.13.0"  # the CPU wheel; pick another CPU build if yours differs
  fi
fi
"$PY" -m pip install -q -e "$TARGET"
