#!/usr/bin/env bash
# docs/performance.md, "Waiting for data, and CUDA graphs": the fastest single-GPU scenarios
# timed from asking for a step's batches (the wait for data counted and shown), and the same
# with inductor's CUDA graphs (TORCHINDUCTOR_CUDAGRAPHS=1 on the compiled decoder layers).
# Two at a time on a 2-GPU host.      bash benchmarks/device_levers.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/device_levers}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1
limit=${RUN_TIMEOUT:-540}
bench="python3 benchmarks/compare.py --fast_kernels True --steps 6"
( export CUDA_VISIBLE_DEVICES=0; end=$((SECONDS + limit))
  timeout $((end - SECONDS)) $bench --only lora_8b_mb1_noac_compile --workdir /tmp/l0 \
      --out "$out/lora.json" > "$out/lora.log" 2>&1
  TORCHINDUCTOR_CUDAGRAPHS=1 timeout $((end - SECONDS)) $bench --only lora_8b_mb1_noac_compile \
      --workdir /tmp/l1 --out "$out/lora_graphs.json" > "$out/lora_graphs.log" 2>&1 ) &
( export CUDA_VISIBLE_DEVICES=1; end=$((SECONDS + limit))
  timeout $((end - SECONDS)) $bench --only full_1b_ac_keep6_compile --workdir /tmp/f0 \
      --out "$out/full.json" > "$out/full.log" 2>&1
  TORCHINDUCTOR_CUDAGRAPHS=1 timeout $((end - SECONDS)) $bench --only full_1b_ac_keep6_compile \
      --workdir /tmp/f1 --out "$out/full_graphs.json" > "$out/full_graphs.log" 2>&1
  timeout $((end - SECONDS)) $bench --only qlora_8b_mb1_noac_compile --workdir /tmp/q0 \
      --out "$out/qlora.json" > "$out/qlora.log" 2>&1 ) &
wait
for f in lora lora_graphs full full_graphs qlora; do
  echo "== $f"; grep -v "^{" "$out/$f.log" | grep "|\|failed\|Error" | tail -6
done
