"""The planner's answer as text, and its command line (``python -m llm_finetune.plan``).

``report`` writes the per-GPU and per-rank CPU tables of ``estimate``, then whether the run
fits and, if it does, the fastest setting that still fits (and what compiled layers would
allow), or, if it does not, the changes that would make it fit. ``plan_run`` prints it (what
``finetuning --dry_run`` calls); ``main`` builds and validates the run from the same settings as
``finetuning``; ``cli`` turns a ConfigError into an error message and exit status 2.
"""

import dataclasses
import sys

from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.preflight import validate
from llm_finetune.distributed import world_size_from_env
from llm_finetune.plan.counts import ModelCounts, count_parameters
from llm_finetune.plan.memory import GIB, estimate, gpu_memory_available, sequences_per_sample
from llm_finetune.plan.search import combined_fix, faster_flags, planned_fixes


def report(run, world_size: int, gpu_memory: float | None, counts: ModelCounts) -> str:
    plan = estimate(run, world_size, counts)
    t = run.train
    sequences = t.batch_size_training * sequences_per_sample(run)
    pairs = f" ({t.batch_size_training} DPO pairs)" if sequences != t.batch_size_training else ""
    lines = [f"memory plan: {t.model_name}, {counts.total / 1e9:.2f}B parameters "
             f"({counts.trainable / 1e6:.1f}M trainable), {world_size} GPU(s), "
             f"batch {sequences}{pairs} x {t.context_length} tokens per GPU",
             "", "| per GPU | GiB |", "| --- | ---: |"]
    lines += [f"| {name} | {value / GIB:.2f} |" for name, value in plan.gpu.items()]
    if plan.gpu_loading:
        lines.append(f"| while loading (whole 4-bit model on each GPU, before sharding) | "
                     f"{plan.gpu_loading / GIB:.2f} |")
    if plan.gpu_rebucketing:
        lines.append(f"| start of step 2 (DDP's gradient buckets made again beside the first) | "
                     f"{plan.gpu_rebucketing / GIB:.2f} |")
    kept = "gradients" not in plan.backward_only  # accumulated, or DDP's (kept in its buckets)
    lines.append(f"| end of forward ({'gradients kept' if kept else 'no gradients yet'}) | "
                 f"{plan.forward_end / GIB:.2f} |")
    lines.append(f"| end of backward (one layer's activations) | {plan.backward_end / GIB:.2f} |")
    lines.append(f"| **peak** | **{plan.gpu_peak / GIB:.2f}** |")
    lines += ["", "| CPU RAM per rank | GiB |", "| --- | ---: |"]
    lines += [f"| {name} | {value / GIB:.2f} |" for name, value in plan.cpu.items()]
    if gpu_memory is None:
        lines.append("\nno GPU found and no --gpu_memory given: cannot say whether it fits")
    elif plan.gpu_peak <= gpu_memory:
        lines.append(f"\nfits: {plan.gpu_peak / GIB:.1f} of {gpu_memory / GIB:.1f} GiB per GPU")
        # under --auto_fit the run already has the fastest setting (for 90% of the memory)
        faster = "" if t.auto_fit else faster_flags(run, world_size, gpu_memory, counts)
        if faster:
            lines.append(f"fastest within the same memory: {faster}")
        if not t.torch_compile and t.batching_strategy == "packing":
            # compiled layers run faster and keep about a quarter less activation memory
            compiled_run = dataclasses.replace(
                run, train=dataclasses.replace(t, torch_compile=True))
            compiled = "" if t.auto_fit else faster_flags(compiled_run, world_size, gpu_memory,
                                                          counts)
            lines.append("faster still: add --torch_compile True (compiled layers" + (
                f"; their smaller activations fit {compiled})" if compiled and compiled != faster
                else ")"))
    else:
        lines.append(f"\ndoes NOT fit: {plan.gpu_peak / GIB:.1f} GiB needed per GPU, "
                     f"{gpu_memory / GIB:.1f} GiB available. Changes that would fit:")
        fixes = [f"  - {description}: {peak / GIB:.1f} GiB"
                 for description, _, _, peak in planned_fixes(run, world_size)
                 if peak <= gpu_memory]
        lines += fixes[:4] or combined_fix(run, world_size, gpu_memory)
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def plan_run(run, world_size: int, gpu_memory=None) -> str:
    """Print and return the memory plan of a validated run (``finetuning --dry_run`` too)."""
    text = report(run, world_size, gpu_memory_available(gpu_memory), count_parameters(run))
    print(text, flush=True)
    return text


def main(world_size: int = 0, gpu_memory=None, **kwargs) -> str:
    """The memory plan of the run ``kwargs`` describe on ``world_size`` GPUs (default: the
    torchrun world, else 1); ``gpu_memory`` (e.g. 80GiB) defaults to the GPU present."""
    run = build_run_config(**kwargs)
    world_size = world_size or world_size_from_env()
    validate(run, world_size, cuda=True)
    return plan_run(run, world_size, gpu_memory)


def cli(**kwargs) -> None:
    if any(kwargs.pop(flag, False) for flag in ("help", "h")):
        print("usage: python -m llm_finetune.plan [--world_size N] [--gpu_memory 80GiB] "
              "[--SETTING VALUE ...]\n"
              "The memory plan of the run that python -m llm_finetune.finetuning would start with "
              "the same settings (its --help lists them), on --world_size GPUs (default: the "
              "torchrun world, else 1) of --gpu_memory each (default: the GPU present). "
              "Docs: docs/memory.md")
        return
    try:
        main(**kwargs)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
