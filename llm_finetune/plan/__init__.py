"""Will this run fit? Per-GPU and per-rank CPU memory of a run, before launching it.

    python -m llm_finetune.plan --model_name llama3-8b --use_peft --world_size 2 --gpu_memory 80GiB
    python -m llm_finetune.finetuning --dry_run ...        # the same table, then exit

Takes the same settings as ``finetuning``. Parameter counts are exact: the model is built on the
meta device from its config (no weights read, no memory used) with the run's adapters applied.
Activations and logits follow a per-token model of a Llama-style decoder layer, checked against
``torch.cuda.max_memory_allocated`` of real runs on H100/H200 (docs/memory.md). When the run
does not fit, the planner tries the usual fixes one at a time and lists those that would fit.

One module per job, each importing only those above it:
``counts`` (the model's parameter counts, on the meta device), ``memory`` (bytes per GPU and per
rank from those counts), ``search`` (the fixes that fit, the fastest setting, ``--auto_fit``),
``report`` (the text, ``plan_run`` for ``--dry_run``, the command line) and ``gpu_defaults``
(a GPU run's fast values for the settings not given). The names below are
re-exported for ``from llm_finetune.plan import ...``; to monkeypatch a function, patch it in the
module that calls it (``llm_finetune.plan.memory.host_memory``), not here. The function
``report`` is not re-exported: ``llm_finetune.plan.report`` is its module.
"""

from llm_finetune.plan.counts import ModelCounts, count_parameters
from llm_finetune.plan.memory import (COMPILED_ACTIVATIONS, GIB, WORKSPACE_BYTES, Plan,
                                      activation_bytes_per_token_per_layer, estimate,
                                      gpu_memory_available, parse_bytes,
                                      quantized_bytes_per_param, shard_group)
from llm_finetune.plan.search import (AUTO_FIT_SHARE, Setting, auto_fit, candidate_fixes,
                                      combined_fix, compute_per_token, current_setting,
                                      faster_flags, fastest_setting, fit_to_gpu, planned_fixes,
                                      setting_flags, with_setting)
from llm_finetune.plan.report import cli, main, plan_run
from llm_finetune.plan.gpu_defaults import apply_gpu_defaults

__all__ = [
    "ModelCounts", "count_parameters",
    "COMPILED_ACTIVATIONS", "GIB", "WORKSPACE_BYTES", "Plan",
    "activation_bytes_per_token_per_layer", "estimate", "gpu_memory_available", "parse_bytes",
    "quantized_bytes_per_param", "shard_group",
    "AUTO_FIT_SHARE", "Setting", "auto_fit", "candidate_fixes", "combined_fix", "compute_per_token",
    "current_setting", "faster_flags", "fastest_setting", "fit_to_gpu", "planned_fixes",
    "setting_flags", "with_setting",
    "cli", "main", "plan_run",
    "apply_gpu_defaults",
]
