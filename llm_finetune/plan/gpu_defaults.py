"""Fast by default: on a GPU, the settings a user did not pin take their fastest safe values.

llama-recipes' defaults (SDPA attention, 4 sequences per forward, every layer recomputed) are
slower than what the same GPU runs with the same losses: packed batches need their samples kept
apart, which SDPA can only do with a dense mask and its slow kernel, and activation
checkpointing recomputes layers whose activations would have fitted. So a GPU run, unless told
otherwise, takes

- ``--use_fast_kernels True``: flash-attention 2 when installed, else flex attention for packed
  batches (``model.attention_implementation``);
- the planner's fastest micro-batch and checkpointing within ``AUTO_FIT_SHARE`` of the GPU,
  as ``--auto_fit`` gives it, at the same tokens per optimizer step.

Giving any of the settings involved pins it (``PINS``): ``--use_fast_kernels False`` keeps
SDPA, and a given micro-batch, accumulation or checkpointing setting (or ``--auto_fit``
either way) keeps the run's own. The choice is printed at start. CPU runs are left as they are.
docs/performance.md ("Fast by default") has the measurements.
"""

import dataclasses

from llm_finetune.config_utils import ConfigError
from llm_finetune.model import attention_implementation, is_vision_model
from llm_finetune.plan.memory import GIB, estimate, gpu_memory_available
from llm_finetune.plan.counts import count_parameters
from llm_finetune.plan.search import (AUTO_FIT_SHARE, current_setting, fastest_setting,
                                      setting_flags, with_setting)
from llm_finetune.preflight import validate

ATTENTION_PIN = "train_config.use_fast_kernels"
# a micro-batch or checkpointing setting the user gave is theirs: the planner leaves all alone
PINS = ("train_config.auto_fit", "train_config.batch_size_training",
        "train_config.gradient_accumulation_steps", "fsdp_config.fsdp_activation_checkpointing",
        "fsdp_config.no_checkpoint_layers")


def apply_gpu_defaults(run, world_size: int, cuda: bool, verbose: bool):
    """``run`` with the fast values of the settings not given, on a GPU (``run`` itself on a
    CPU); prints what was chosen when ``verbose``."""
    if not cuda:
        return run
    chosen = []
    if ATTENTION_PIN not in run.given and not run.train.use_fast_kernels:
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, use_fast_kernels=True))
        kernel = attention_implementation(True, run.train.batching_strategy == "packing")
        chosen.append(f"--use_fast_kernels True ({kernel} attention)")
    if not any(pin in run.given for pin in PINS):
        run, fitted = fastest_for_gpu(run, world_size)
        chosen.append(fitted)
    if verbose and chosen:
        print("GPU defaults for the settings not given (give a setting to pin it; "
              "docs/performance.md): " + "; ".join(chosen), flush=True)
    validate(run, world_size, cuda)
    return run


def fastest_for_gpu(run, world_size: int) -> tuple:
    """(``run`` with the planner's fastest setting that fits the GPU, what was chosen). A run
    the planner cannot plan, or that it finds no setting for, keeps its own setting: the
    default must never stop a run the user's settings would start."""
    if is_vision_model(run.train.model_name):
        return run, ("the run's own micro-batch and checkpointing (the planner's vision plans "
                     "are not yet checked on a GPU: --auto_fit asks for them)")
    gpu_memory = gpu_memory_available(run.train.gpu_memory)
    try:
        counts = count_parameters(run)
        best = fastest_setting(run, world_size, AUTO_FIT_SHARE * gpu_memory, counts)
    except ConfigError as error:
        return run, f"the run's own micro-batch and checkpointing (not planned: {error})"
    if best is None:
        return run, (f"the run's own micro-batch and checkpointing (the planner finds none that "
                     f"fits in {AUTO_FIT_SHARE:.0%} of {gpu_memory / GIB:.1f} GiB: "
                     "python -m llm_finetune.plan lists the fixes)")
    if best == current_setting(run, counts):
        change = "the run's own micro-batch and checkpointing"
    else:
        change = setting_flags(run, best, counts)
    fitted = with_setting(run, best, counts.num_layers)
    peak = estimate(fitted, world_size, counts).gpu_peak
    return fitted, (f"{change}, the planner's fastest: planned {peak / GIB:.1f} of "
                    f"{gpu_memory / GIB:.1f} GiB")
