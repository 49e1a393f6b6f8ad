"""Padding against packing on one data set: how much of each batch is padding, how many
optimizer steps an epoch takes, and the real (non-padding) tokens per second of training.

    python benchmarks/batching.py                                  # shipped data, tiny model, CPU
    python benchmarks/batching.py --dataset file_dataset --file_dataset.data_files my.jsonl \
        --model_name meta-llama/Llama-3.2-1B --context_length 2048 --batch_size_training 4

Any finetuning flag is accepted and applies to both runs; each strategy trains ``--steps``
optimizer steps (default 20) with checkpoints and evaluation off. Prints a markdown table.
"""

import math

import fire
import torch

from llm_finetune import finetuning
from llm_finetune.config_utils import build_run_config
from llm_finetune.data.loaders import load_dataset_split, make_loader, padding_fraction
from llm_finetune.distributed import DistInfo
from llm_finetune.model import load_tokenizer


def epoch_shape(run, tokenizer) -> tuple[float, int]:
    """(padding fraction, optimizer steps per epoch) of the train split, one rank."""
    data = load_dataset_split(run, tokenizer, run.dataset.train_split)
    single = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    loader = make_loader(data, run.train.batch_size_training, run, tokenizer, single, shuffle=True,
                     accumulation=run.train.gradient_accumulation_steps)
    steps = math.ceil(len(loader) / run.train.gradient_accumulation_steps)
    return padding_fraction(loader.dataset, loader.batch_sampler, run.train), steps


def main(steps: int = 20, **flags) -> None:
    rows = []
    for strategy in ("padding", "packing"):
        settings = dict(flags, batching_strategy=strategy, max_train_step=steps,
                        run_validation=False, save_model=False, save_metrics=False,
                        output_dir=f"output/batching-{strategy}", overwrite_output_dir=True)
        run = build_run_config(**settings)
        padding, steps_per_epoch = epoch_shape(run, load_tokenizer(run.train))
        summary = finetuning.main(**settings)
        tokens = [m["tokens_per_s"] for m in summary["metrics"] if "tokens_per_s" in m]
        median = sorted(tokens[2:] or tokens)[len(tokens[2:] or tokens) // 2]
        rows.append((strategy, padding, steps_per_epoch, median))
    print("\n| batching | padding share | steps per epoch | real tokens/s (median) |")
    print("| --- | ---: | ---: | ---: |")
    for strategy, padding, steps_per_epoch, median in rows:
        print(f"| {strategy} | {padding:.1%} | {steps_per_epoch} | {median:,.0f} |")


if __name__ == "__main__":
    fire.Fire(main)
