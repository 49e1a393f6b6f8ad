#!/usr/bin/env bash
# The Llama Guard 3 1B preset (configs/llama_guard3_1b_full.yaml) on one GPU: a random-init
# model of its shape, 20 steps on Llama Guard examples written here and formatted with every
# augmentation; tokens/s, peak GiB against the planner's, and the saved model loaded with
# plain transformers (benchmarks/device_llama_guard.py). About 2 minutes on an H200.
#   bash benchmarks/device_llama_guard.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/device_llama_guard}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1 HF_HUB_OFFLINE=1
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} timeout "${RUN_TIMEOUT:-240}" \
    python3 benchmarks/device_llama_guard.py --out "$out" --steps 20 2>&1 | tee "$out/device_llama_guard.log"
rc=${PIPESTATUS[0]}
echo "rc=$rc"; grep -h -E "run summary|^error" "$out/train.log" | cut -c1-400
exit "$rc"
