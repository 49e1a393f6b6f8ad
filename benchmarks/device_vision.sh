#!/usr/bin/env bash
# Llama-3.2-11B-Vision's shape (random init) fine-tuned on one GPU: LoRA (with and without
# activation checkpointing), QLoRA, llama-recipes' --freeze_LLM_only and full fine-tuning in
# pure bf16, each against the memory planner (docs/vision.md has the results).
#   [VISION_RUNS="lora qlora"] bash benchmarks/device_vision.sh OUT [STEPS]
# Expects the wheels of ../shared/tools/device-wheels.sh in .whl/ (bitsandbytes, datasets, fire).
set -uo pipefail
out=${1:?output directory}; steps=${2:-10}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"
work=/tmp/vision; rm -rf "$work"; mkdir -p "$out"
python3 benchmarks/vision_shape.py "$work" --rows 64 --text_tokens 1900 || exit 1
declare -A runs=(
  [lora]="--use_peft True"
  [lora_noac]="--use_peft True --fsdp_config.fsdp_activation_checkpointing False"
  [qlora]="--use_peft True --quantization 4bit"
  [freeze_llm_only]="--freeze_LLM_only True"
  [full_pure_bf16]="--fsdp_config.pure_bf16 True --lr 1e-5"
)
done_runs=()
for name in ${VISION_RUNS:-lora lora_noac qlora freeze_llm_only full_pure_bf16}; do
  echo "== $name"
  # shellcheck disable=SC2086
  python3 -m llm_finetune.finetuning --model_name "$work/model" --dataset file_dataset \
    --file_dataset.data_files "$work/data/rows.jsonl" --batching_strategy padding \
    --context_length 2048 --batch_size_training 2 --num_epochs 1 --run_validation False \
    --max_train_step "$steps" --save_model False --plot_metrics False \
    --output_dir "$work/runs/$name" ${runs[$name]} > "$out/$name.log" 2>&1
  echo "exit $?"; grep -E "^run summary|Error|error:" "$out/$name.log" | tail -3
  cp "$work/runs/$name/metrics.jsonl" "$out/$name.metrics.jsonl" 2>/dev/null \
    && done_runs+=("$work/runs/$name:1")
done
python3 benchmarks/planner_accuracy.py "${done_runs[@]}" | tee "$out/planner.md"
