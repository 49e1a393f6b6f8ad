#!/usr/bin/env bash
# The harness's loss check on the GPU (docs/performance.md): each speed scenario's levers
# against its plain path, same seed and data, two scenarios at a time on a 2-GPU host.
#   bash benchmarks/device_check.sh OUT_DIR [compare.py flags, e.g. --fp32 True --tolerance 1e-4]
set -uo pipefail
out=${1:-/tmp/device_check}; shift || true; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1
check="python3 benchmarks/compare.py --check True --fast_kernels True --steps 4 $*"
( CUDA_VISIBLE_DEVICES=0 timeout "${RUN_TIMEOUT:-500}" $check --workdir /tmp/check0 \
      --only lora_8b_mb1_noac_compile,lora_8b_ac_keep11_compile,full_1b_ac_keep6_compile \
      --out "$out/check_gpu0.json" > "$out/check_gpu0.log" 2>&1 ) &
( CUDA_VISIBLE_DEVICES=1 timeout "${RUN_TIMEOUT:-500}" $check --workdir /tmp/check1 \
      --only qlora_8b_mb1_noac_compile --out "$out/check_gpu1.json" > "$out/check_gpu1.log" 2>&1 ) &
wait
grep -h "^|" "$out"/check_gpu*.log
