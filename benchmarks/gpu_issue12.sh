#!/usr/bin/env bash
# The GPU rows of issue 12 in one run of about 15 minutes on one H100/H200 (80+ GB). Not run yet:
# no session has been lent a GPU so far. Each step has its own time limit, so a slow or failing
# step costs only its share; the tables go to $OUT (default benchmarks/results/gpu-<date>).
#   bash benchmarks/gpu_issue12.sh            # needs transformers (bash scripts/setup.sh --dev)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}
mkdir -p "$OUT"
PEAK=${PEAK_TFLOPS:-989}  # dense bf16 TFLOP/s of an H100/H200 SXM
step() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  echo "## $name" | tee -a "$OUT/summary.md"
  timeout "$limit" "$@" 2>"$OUT/$name.err" | tee -a "$OUT/$name.txt" "$OUT/summary.md" \
    || echo "($name: stopped or failed, exit ${PIPESTATUS[0]}; see $OUT/$name.err)" | tee -a "$OUT/summary.md"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/summary.md"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$OUT/summary.md"
# 1. GPT-2-small training, bf16 weights, compiled, tformer vs Hugging Face (anchor, H100 2026-11-24:
#    HF compiled 375k tokens/s, 33% MFU; nanoGPT eager 307k)
step gpt2_train 360 python benchmarks/bench_gpt.py --device cuda --preset gpt2-small --batch 16 --seq 1024 \
  --dtype bfloat16 --compile --steps 20 --warmup 5 --cases tformer-train,hf-train --peak-tflops "$PEAK"
# 2. GPT-2-small greedy decode at batch 1 (goal <= 0.5 ms/token): tformer compiled vs HF's caches
step gpt2_decode 240 python benchmarks/bench_gpt.py --device cuda --preset gpt2-small --dtype bfloat16 \
  --compile --cases tformer-decode,hf-decode-dynamic,hf-decode-static
# 3. Sliding-window 1024 with FlexAttention vs dense causal SDPA, forward + backward (goal >= 3x at 16k)
step flex_16k 240 python benchmarks/bench_sparse.py attention --device cuda --dtype bfloat16 \
  --lengths 4096 16384 --windows 1024
echo "tables: $OUT/summary.md"
