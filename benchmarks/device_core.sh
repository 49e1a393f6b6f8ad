#!/usr/bin/env bash
# GPU check of the core engine on a 2-GPU machine (see docs/gpu_runs.md for the results):
# NCCL FSDP on the tiny model, fp32 parity of FSDP vs one GPU, and real-shape runs.
#   bash benchmarks/device_core.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/device_core}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1
ft="-m llm_finetune.finetuning --overwrite_output_dir True --num_workers_dataloader 2"
run() { local name=$1; shift; echo "== $name: $*"; timeout "${RUN_TIMEOUT:-240}" "$@" > "$out/$name.log" 2>&1; echo "rc=$?";
        grep -h "run summary" "$out/$name.log" | cut -c1-400; }
tr2="torchrun --standalone --nproc_per_node 2"
python3 benchmarks/make_shape_config.py llama3-8b /tmp/llama3-8b
python3 benchmarks/make_shape_config.py llama3.2-1b /tmp/llama3.2-1b
python3 -c "from tests.helpers import save_tiny_model; from pathlib import Path; save_tiny_model(Path('/tmp/tinyw'))"
# the shipped data and the tiny recipe's lengths and lr: /tmp/tinyw is a directory, not the
# built-in name, so it gets the defaults (llama-recipes': samsum from the hub) otherwise
data="--dataset alpaca_dataset --alpaca_dataset.data_path llm_finetune/assets/data/tiny_alpaca.json"
fp32="--model_name /tmp/tinyw $data --batching_strategy padding --context_length 512 --lr 1e-3 --mixed_precision False --fsdp_config.mixed_precision False --lora_config.lora_dropout 0 --max_train_step 10 --save_model False"
if [ -z "${SKIP_PARITY:-}" ]; then
run tiny_1gpu_fp32 env CUDA_VISIBLE_DEVICES=0 python3 $ft $fp32 --batch_size_training 8 --output_dir $out/tiny_1gpu_fp32
run tiny_fsdp_fp32 $tr2 $ft $fp32 --enable_fsdp --batch_size_training 4 --output_dir $out/tiny_fsdp_fp32
python3 - "$out" <<'PY'
import json, sys
load = lambda d: [json.loads(l)["loss"] for l in open(f"{sys.argv[1]}/{d}/metrics.jsonl") if '"loss"' in l]
a, b = load("tiny_1gpu_fp32"), load("tiny_fsdp_fp32")
print("fp32 parity, max relative loss difference FSDP(2 GPUs) vs 1 GPU:",
      max(abs(x - y) / abs(x) for x, y in zip(a, b)), "over", len(a), "steps")
PY
fi
run tiny_fsdp_lora_bf16 $tr2 $ft --enable_fsdp --use_peft --max_train_step 20 --output_dir $out/tiny_fsdp_lora_bf16
ls "$out/tiny_fsdp_lora_bf16"  # the adapter, in output_dir as llama-recipes saves it
big="$data --tokenizer_name tiny-llama --batching_strategy packing --context_length 2048 --batch_size_training 4 --run_validation False --save_model False --num_epochs 3"
run llama8b_lora_fsdp2 $tr2 $ft $big --model_name /tmp/llama3-8b --enable_fsdp --low_cpu_fsdp --use_peft --fsdp_config.pure_bf16 True --max_train_step 8 --output_dir $out/llama8b_lora_fsdp2
run llama1b_full_fsdp2 $tr2 $ft $big --model_name /tmp/llama3.2-1b --enable_fsdp --low_cpu_fsdp --fsdp_config.pure_bf16 True --max_train_step 10 --output_dir $out/llama1b_full_fsdp2
run llama8b_lora_1gpu env CUDA_VISIBLE_DEVICES=0 python3 $ft $big --model_name /tmp/llama3-8b --use_peft --max_train_step 8 --output_dir $out/llama8b_lora_1gpu
python3 benchmarks/runs_table.py "$out"
