"""The memory planner against measured runs: for each finished run directory, the planner's
predicted peak GPU memory (from the run's own run_config.json) beside the peak the run measured
(``torch.cuda.max_memory_allocated``, last step of metrics.jsonl), and its steady tokens/s.

    python benchmarks/planner_accuracy.py RUN_DIR:WORLD_SIZE [RUN_DIR:WORLD_SIZE ...]

Prints a markdown table (docs/memory.md records it).
"""

import json
import sys
from pathlib import Path

from llm_finetune.config_utils import build_run_config
from llm_finetune.metrics import read_metrics, steady_tokens_per_s
from llm_finetune.plan import GIB, estimate


def settings_of(run_dir: Path) -> dict:
    saved = json.loads((run_dir / "run_config.json").read_text())
    settings = {}
    for section, values in saved.items():
        for key, value in values.items():
            if value is not None:
                settings[key if section == "train_config" else f"{section}.{key}"] = value
    return settings


def measured(run_dir: Path) -> tuple[float, float]:
    """(peak GiB, steady tokens/s)."""
    steps, _ = read_metrics(run_dir)
    return steps[-1]["peak_gpu_mem_gib"], steady_tokens_per_s(steps)


def describe(run) -> str:
    t, f = run.train, run.fsdp
    kind = (f"QLoRA ({t.quantization})" if t.quantization else
            ("LoRA" if t.peft_method == "lora" else t.peft_method) if t.use_peft else
            "freeze_LLM_only" if t.freeze_LLM_only else "full")
    parts = [t.model_name.rsplit("/", 1)[-1], kind, f"batch {t.batch_size_training} x "
             f"{t.context_length}", "AC" if f.fsdp_activation_checkpointing else "no AC"]
    if t.enable_fsdp:
        parts.append("FSDP")
    if t.enable_ddp:
        parts.append("DDP")
    parts.append("pure bf16" if f.pure_bf16 else "fp16" if (t.use_fp16 or f.use_fp16)
                 else "bf16 mixed" if t.mixed_precision else "fp32")
    return ", ".join(parts)


def main(*specs: str) -> None:
    print("| run | GPUs | predicted GiB | measured GiB | error | tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for spec in specs:
        directory, _, world = spec.rpartition(":")
        run = build_run_config(**settings_of(Path(directory)))
        predicted = estimate(run, int(world)).gpu_peak / GIB
        peak, tokens_per_s = measured(Path(directory))
        print(f"| {describe(run)} | {world} | {predicted:.1f} | {peak:.1f} | "
              f"{(predicted - peak) / peak:+.1%} | {tokens_per_s:,.0f} |", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
