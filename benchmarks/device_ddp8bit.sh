#!/usr/bin/env bash
# 8-bit LoRA data parallel (DDP) on a Llama-3.2-1B-shaped checkpoint (random weights written to
# disk first: 8-bit quantises as it loads), 1 GPU against 2 GPUs with the same per-GPU batch.
#   bash benchmarks/device_ddp8bit.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/device_ddp8bit}; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1
ckpt=/tmp/llama3.2-1b-random
[ -f $ckpt/config.json ] || python3 -c "import torch; from llm_finetune.model import meta_model, random_init; \
from llm_finetune.shapes import SHAPES; m = random_init(meta_model(SHAPES['llama3.2-1b'](), torch.bfloat16, 'sdpa'), 0, 'cuda'); \
m.save_pretrained('$ckpt')"
# the shipped data: the default data set (samsum) would need the hub
ft="-m llm_finetune.finetuning --overwrite_output_dir True --model_name $ckpt --tokenizer_name tiny-llama --use_peft --quantization 8bit --dataset alpaca_dataset --alpaca_dataset.data_path llm_finetune/assets/data/tiny_alpaca.json
    --batching_strategy packing --context_length 2048 --batch_size_training 4 --max_train_step 10
    --num_epochs 5 --run_validation False --save_model False --num_workers_dataloader 2 --use_fast_kernels True"
CUDA_VISIBLE_DEVICES=0 timeout 240 python3 $ft --output_dir $out/lora8bit_1gpu > $out/lora8bit_1gpu.log 2>&1; echo "1 GPU rc=$?"
timeout 240 torchrun --standalone --nproc_per_node 2 $ft --enable_ddp --output_dir $out/lora8bit_ddp2 > $out/lora8bit_ddp2.log 2>&1; echo "DDP 2 GPUs rc=$?"
python3 benchmarks/runs_table.py "$out"
