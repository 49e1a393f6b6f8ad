"""Fast by default: on a GPU, the settings a user did not pin take their fastest safe values.

llama-recipes' defaults (SDPA attention, 4 sequences per forward, every layer recomputed) are
slower than what the same GPU runs with the same losses: packed batches need their samples kept
apart, which SDPA can only do with a dense mask and its slow kernel, and activation
checkpointing recomputes layers whose activations would have fitted. So a GPU run, unless told
otherwise, takes

- ``--use_fast_kernels True``: flash-attention 2 when installed, else PyTorch's varlen
  flash-attention kernel for packed batches (``model.attention_implementation``);
- the planner's fastest micro-batch and checkpointing (``search.fastest_setting``, by the
  step-time model) within ``DEFAULT_SHARE`` of the GPU, at the same tokens per optimizer step.

A setting the user gave, or the built-in model's recipe set, is pinned (``PINS``):
``--use_fast_kernels False`` keeps SDPA, and any micro-batch, accumulation or checkpointing
setting (or ``--auto_fit`` either way) keeps the run's own. Vision models keep their attention
(mllama has no flash-attention 2, and their batches are padded) and take the planned setting.
The choice is printed at start. CPU runs are left as they are. docs/performance.md ("Fast by
default") has the measurements.
"""

import dataclasses

import torch

from llm_finetune.config_utils import ConfigError
from llm_finetune.model import is_vision_model
from llm_finetune.plan.counts import count_parameters
from llm_finetune.plan.memory import GIB, gpu_memory_available
from llm_finetune.plan.search import (apply_setting, current_setting, fastest_setting,
                                      setting_seconds)
from llm_finetune.preflight import validate

ATTENTION_PIN = "train_config.use_fast_kernels"
# a micro-batch or checkpointing setting given is the user's: the planner leaves all alone
PINS = ("train_config.auto_fit", "train_config.batch_size_training",
        "train_config.gradient_accumulation_steps", "fsdp_config.fsdp_activation_checkpointing",
        "fsdp_config.no_checkpoint_layers")
# a default plans for less of the GPU than --auto_fit's 90%: the user did not ask for it, and
# evaluation, sample generation and other processes on the GPU are not in the plan
DEFAULT_SHARE = 0.8
# a change the step-time model gains less than this from is not worth the memory it takes
LEAST_GAIN = 0.01


def apply_gpu_defaults(run, world_size: int, cuda: bool, verbose: bool):
    """``run`` with the fast values of the settings not pinned, when it runs on a GPU (or plans
    for one: ``cuda``); ``run`` itself otherwise. Prints what was chosen when ``verbose``."""
    if not cuda:
        return run
    chosen = []
    if (ATTENTION_PIN not in run.given and not run.train.use_fast_kernels
            and not is_vision_model(run.train.model_name)):
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, use_fast_kernels=True))
        chosen.append("--use_fast_kernels True (flash-attention: PyTorch's varlen kernel for "
                      "packed batches, flash-attention 2 where installed)")
    if not any(pin in run.given for pin in PINS):
        run, fitted = fastest_for_gpu(run, world_size)
        chosen.append(fitted)
    if not chosen:
        return run
    if verbose:
        print("GPU defaults for the settings not given (give a setting to pin it; "
              "docs/performance.md): " + "; ".join(chosen), flush=True)
    validate(run, world_size, cuda)
    return run


def default_budget(run, world_size: int) -> float:
    """Bytes the defaults plan for: ``DEFAULT_SHARE`` of the GPU (``--gpu_memory``, else its
    size), and in one process no more than 90% of what is free on it now. Ranks of one run
    plan for the same size, so that they choose alike."""
    budget = DEFAULT_SHARE * gpu_memory_available(run.train.gpu_memory)
    if world_size == 1 and not run.train.gpu_memory and torch.cuda.is_available():
        budget = min(budget, 0.9 * torch.cuda.mem_get_info()[0])
    return budget


def fastest_for_gpu(run, world_size: int) -> tuple:
    """(``run`` with the planner's fastest setting that fits the default budget, what was
    chosen). A run the planner cannot plan, or finds no setting for, keeps its own: the
    default must never stop a run the user's settings would start."""
    budget = default_budget(run, world_size)
    try:
        counts = count_parameters(run)
        best = fastest_setting(run, world_size, budget, counts)
    except ConfigError as error:
        return run, f"the run's own micro-batch and checkpointing (not planned: {error})"
    if best is None:
        return run, (f"the run's own micro-batch and checkpointing (the planner finds none that "
                     f"fits in {budget / GIB:.1f} GiB: python -m llm_finetune.plan lists the "
                     "fixes)")
    now = current_setting(run, counts)
    if best == now or (setting_seconds(run, best, counts)
                       > (1 - LEAST_GAIN) * setting_seconds(run, now, counts)):
        return run, "the run's own micro-batch and checkpointing, the planner's fastest"
    fitted, change = apply_setting(run, best, counts, world_size, budget)
    return fitted, f"{change} (the planner's fastest)"
