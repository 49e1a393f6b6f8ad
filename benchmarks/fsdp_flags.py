"""What each FSDP setting costs: the same run under torchrun with one setting changed at a
time, tokens/s and peak GPU memory per GPU, as a markdown table (docs/fsdp.md).

    python benchmarks/fsdp_flags.py --nproc 2 --model llama3.2-1b

Random-init model of the given shape, full fine-tuning in pure bf16, packed shipped data,
4 x 2048 tokens per GPU, 8 steps; tokens/s is the median of steps 3+ summed over ranks.
"""

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import fire

from llm_finetune.metrics import read_metrics, steady_tokens_per_s

REPO = Path(__file__).resolve().parent.parent
SHIPPED_DATA = str(REPO / "llm_finetune" / "assets" / "data" / "tiny_alpaca.json")
VARIANTS = {
    "FULL_SHARD (default: BACKWARD_PRE prefetch, limit_all_gathers, AC)": [],
    "backward_prefetch NONE": ["--fsdp_config.backward_prefetch", "NONE"],
    "limit_all_gathers False": ["--fsdp_config.limit_all_gathers", "False"],
    "SHARD_GRAD_OP": ["--fsdp_config.sharding_strategy", "SHARD_GRAD_OP"],
    "NO_SHARD": ["--fsdp_config.sharding_strategy", "NO_SHARD"],
    "no activation checkpointing": ["--fsdp_config.fsdp_activation_checkpointing", "False"],
    "fsdp_cpu_offload": ["--fsdp_config.fsdp_cpu_offload", "True"],
}


def main(nproc: int = 2, model: str = "llama3.2-1b", steps: int = 8, only=()) -> None:
    """``only``: indices of VARIANTS to run (e.g. ``--only 0,3``); default all."""
    wanted = {int(i) for i in (str(only).split(",") if isinstance(only, (str, int)) else only)}
    work = Path(tempfile.mkdtemp(prefix="fsdp-flags-"))
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
               TOKENIZERS_PARALLELISM="false")
    print("| setting | tokens/s | peak GiB/GPU |\n| --- | ---: | ---: |", flush=True)
    for index, (name, flags) in enumerate(VARIANTS.items()):
        if wanted and index not in wanted:
            continue
        out = work / str(index)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(nproc), "-m", "llm_finetune.finetuning", "--overwrite_output_dir", "True",
               "--model_name", model,
               "--tokenizer_name", "tiny-llama", "--dataset", "alpaca_dataset",
               "--alpaca_dataset.data_path", SHIPPED_DATA, "--enable_fsdp",
               "--fsdp_config.pure_bf16", "True", "--batching_strategy", "packing",
               "--context_length", "2048",
               "--batch_size_training", "4", "--max_train_step", str(steps), "--num_epochs",
               "5", "--run_validation", "False", "--save_model", "False",
               "--num_workers_dataloader", "2", "--output_dir", str(out), *flags]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0 or not (out / "metrics.jsonl").is_file():
            print(f"| {name} | failed: {done.stderr.strip().splitlines()[-1][:80]} | |", flush=True)
            continue
        records, _ = read_metrics(out)
        tokens = steady_tokens_per_s(records)
        print(f"| {name} | {tokens:,.0f} | {records[-1]['peak_gpu_mem_gib']:.1f} |", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
