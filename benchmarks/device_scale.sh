#!/usr/bin/env bash
# Large shapes on 2 GPUs (docs/performance.md, docs/gpu_runs.md): Llama-3-70B QLoRA and LoRA
# built from the config and quantised unit by unit, and Llama-3-8B full fine-tuning on 1 and 2
# GPUs (MFU, scaling), against transformers' Trainer with accelerate FSDP.
#   bash benchmarks/device_scale.sh OUT_DIR [names...]
set -uo pipefail
out=${1:-/tmp/device_scale}; shift || true; mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_DATASETS_DISABLE_PROGRESS_BARS=1
# the shipped data: the default data set (samsum) would need the hub
ft="-m llm_finetune.finetuning --overwrite_output_dir True --num_workers_dataloader 2 --tokenizer_name tiny-llama --dataset alpaca_dataset --alpaca_dataset.data_path llm_finetune/assets/data/tiny_alpaca.json
    --batching_strategy packing --context_length 2048 --run_validation False --save_model False
    --num_epochs 5 --use_fast_kernels True"
tr2="torchrun --standalone --nproc_per_node 2"
declare -A RUNS=(
  [qlora_70b_fsdp2]="$tr2 $ft --model_name llama3-70b --enable_fsdp --use_peft --quantization 4bit --batch_size_training 2 --max_train_step 6"
  [lora_70b_fsdp2]="$tr2 $ft --model_name llama3-70b --enable_fsdp --use_peft --fsdp_config.pure_bf16 True --batch_size_training 2 --max_train_step 6"
  [full_8b_fsdp2]="$tr2 $ft --model_name llama3-8b --enable_fsdp --fsdp_config.pure_bf16 True --batch_size_training 4 --max_train_step 10"
  # within the Trainer's 74.8 GiB per GPU with fp32 master weights like the Trainer's: compiled
  # layers, all recomputed; the planner's fastest setting (18 layers kept); and one sequence
  # per forward (4 accumulation steps: slower under FSDP, which gathers the weights each time)
  [full_8b_fsdp2_fp32_compile]="$tr2 $ft --model_name llama3-8b --enable_fsdp --torch_compile True --batch_size_training 4 --max_train_step 10"
  [full_8b_fsdp2_fp32_keep18]="$tr2 $ft --model_name llama3-8b --enable_fsdp --torch_compile True --batch_size_training 4 --fsdp_config.no_checkpoint_layers 18 --max_train_step 10"
  [full_8b_fsdp2_fp32_mb1_keep22]="$tr2 $ft --model_name llama3-8b --enable_fsdp --torch_compile True --batch_size_training 1 --gradient_accumulation_steps 4 --fsdp_config.no_checkpoint_layers 22 --max_train_step 40"
  # with pure_bf16 no recompute at all fits
  [full_8b_fsdp2_bf16_noac]="$tr2 $ft --model_name llama3-8b --enable_fsdp --fsdp_config.pure_bf16 True --torch_compile True --fsdp_config.fsdp_activation_checkpointing False --batch_size_training 4 --max_train_step 10"
  [trainer_8b_fsdp2]="$tr2 benchmarks/baseline_trainer_fsdp.py --model llama3-8b --batch 4"
  [trainer_8b_fsdp2_compile]="$tr2 benchmarks/baseline_trainer_fsdp.py --model llama3-8b --batch 4 --compile True"
  [full_8b_1gpu]="env CUDA_VISIBLE_DEVICES=0 python3 $ft --model_name llama3-8b --fsdp_config.pure_bf16 True --batch_size_training 4 --max_train_step 10"
)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=(qlora_70b_fsdp2 lora_70b_fsdp2 full_8b_fsdp2 full_8b_1gpu)
for name in "${names[@]}"; do
  echo "== $name: ${RUNS[$name]}"
  start=$(date +%s)
  timeout "${RUN_TIMEOUT:-300}" ${RUNS[$name]} --output_dir "$out/$name" > "$out/$name.log" 2>&1
  echo "rc=$? wall=$(( $(date +%s) - start ))s"; grep -h "run summary\|\[load\]\|\[shard\]\|^RESULT" "$out/$name.log" | cut -c1-600
done
python3 benchmarks/runs_table.py "$out"
