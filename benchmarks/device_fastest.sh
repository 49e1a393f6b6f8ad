#!/usr/bin/env bash
# Single-GPU speed runs of docs/performance.md ("fastest within the same memory"), two at a
# time on a 2-GPU host, one per GPU: LoRA 8B on GPU 0, the per-layer activation measurements
# and QLoRA 8B on GPU 1.     bash benchmarks/device_fastest.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/device_fastest}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1
limit=${RUN_TIMEOUT:-540}
bench="python3 benchmarks/compare.py --fast_kernels True --steps 6"
( export CUDA_VISIBLE_DEVICES=0
  timeout "$limit" $bench --only "${LORA:-lora_8b_mb1_noac_compile,lora_8b_ac_keep11_compile}" \
      --out "$out/lora.json" --workdir /tmp/bench0 > "$out/lora.log" 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1
  timeout 200 python3 benchmarks/layer_activations.py --shapes llama3-8b > "$out/layers.log" 2>&1
  timeout $(( limit - 200 )) $bench --only "${QLORA:-qlora_8b_mb1_noac_compile,qlora_8b_ac}" \
      --out "$out/qlora.json" --workdir /tmp/bench1 > "$out/qlora.log" 2>&1 ) &
wait
for f in layers lora qlora; do echo "== $f"; grep -v "^{" "$out/$f.log" | grep "|\|failed\|Error" | tail -20; done
