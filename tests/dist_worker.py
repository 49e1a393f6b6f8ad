"""Run under ``torchrun --nproc_per_node 2`` by tests/test_distributed.py: several FSDP runs in one
launch (one process group, reused), results written by rank 0 to ``OUT/results.json``."""

import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from llm_finetune import finetuning
from llm_finetune.distributed import setup
from llm_finetune.engine import RankZeroInit, wrap_fsdp
from llm_finetune.config_utils import build_run_config
from llm_finetune.model import load_model
from tests.helpers import DPO, FAST, probe_input

FSDP = dict(FAST, enable_fsdp=True)


def resume_pair(name: str, engine: dict) -> dict:
    """Two cases: a run that saves at step 2, and one resuming from that checkpoint."""
    settings = {k: v for k, v in engine.items()
                if k not in ("num_workers_dataloader", "lora_config.lora_dropout")}
    # 4 optimizer steps: 8 micro-batches per rank (max_train_step counts them, as llama-recipes)
    settings.update(use_peft=True, gradient_accumulation_steps=2, batch_size_training=2,
                    max_train_step=8, run_validation=False, save_steps=2)
    checkpoint = f"{{out}}/{name}/checkpoints/step-00000002"
    return {name: settings, f"{name}_resumed": dict(settings, resume_from_checkpoint=checkpoint)}


CASES = {
    "FULL_SHARD": dict(FSDP, **{"fsdp_config.sharding_strategy": "FULL_SHARD"}),
    "SHARD_GRAD_OP": dict(FSDP, **{"fsdp_config.sharding_strategy": "SHARD_GRAD_OP"}),
    "NO_SHARD": dict(FSDP, **{"fsdp_config.sharding_strategy": "NO_SHARD"}),
    "HYBRID_SHARD": dict(FSDP, **{"fsdp_config.sharding_strategy": "HYBRID_SHARD",
                                  "fsdp_config.sharding_group_size": 2,
                                  "fsdp_config.replica_group_size": 1}),
    "HYBRID_SHARD_replicas": dict(FSDP, **{"fsdp_config.hsdp": True,
                                           "fsdp_config.sharding_group_size": 1,
                                           "fsdp_config.replica_group_size": 2}),
    "lora": dict(FSDP, use_peft=True, peft_method="lora", save_model=True),
    "llama_adapter": dict(FSDP, use_peft=True, peft_method="llama_adapter", lr=1e-2,
                          save_model=True),
    "prefix": dict(FSDP, use_peft=True, peft_method="prefix", lr=1e-1, save_model=True,
                   **{"fsdp_config.fsdp_activation_checkpointing": False}),
    "grad_accum_clip": dict(FSDP, gradient_accumulation_steps=2, gradient_clipping=True,
                            gradient_clipping_threshold=0.5, batch_size_training=2,
                            max_train_step=8),  # 8 micro-batches: 4 optimizer steps
    "packing": dict(FSDP, batching_strategy="packing", context_length=128, batch_size_training=2),
    "full_state_dict": dict(FSDP, save_model=True,
                            **{"fsdp_config.checkpoint_type": "FULL_STATE_DICT"}),
    "sharded_state_dict": dict(FSDP, save_model=True, save_optimizer=True,
                               **{"fsdp_config.checkpoint_type": "SHARDED_STATE_DICT"}),
    "low_cpu_fsdp": dict(FSDP, low_cpu_fsdp=True),
    # QLoRA: 4-bit weights stored as bf16 so FSDP can flatten them, bf16 adapters
    "qlora": dict(FSDP, use_peft=True, quantization="4bit", lr=1e-2, save_model=True,
                  save_steps=2, max_eval_step=2),
    # QLoRA with low_cpu_fsdp: rank 0 reads the full-precision weights, every rank quantises
    # each unit on its own device as FSDP materialises it
    "qlora_low_cpu": dict(FSDP, use_peft=True, quantization="4bit", lr=1e-2, low_cpu_fsdp=True,
                          max_eval_step=2),
    # DDP: a full replica per rank; 8-bit bases, which FSDP cannot shard, train this way
    # full fine-tuning, gradients as views of DDP's buckets, all-reduced in the last of 2
    # micro-batches (no_sync before it), clipped; 4 steps: DDP re-buckets after the first
    "ddp_full_accum": dict(FAST, enable_ddp=True, gradient_accumulation_steps=2,
                           gradient_clipping=True, gradient_clipping_threshold=0.5,
                           batch_size_training=2, max_train_step=8),
    "ddp_8bit": dict(FAST, enable_ddp=True, use_peft=True, quantization="8bit", lr=1e-2,
                     max_train_step=6, save_model=True),
    # float8 matmuls (CPU emulates them) where torchao is installed (not in CI: docs/performance.md)
    **({"fsdp_float8": dict(FSDP, float8=True)} if importlib.util.find_spec("torchao") else {}),
    # random-init models (config only): each rank initialises its own units (SeededInit)
    "seeded_init": dict(FSDP, model_name="tiny-llama"),
    "seeded_init_lora": dict(FSDP, model_name="tiny-llama", use_peft=True, lr=1e-2),
    "seeded_init_tied": dict(FSDP, model_name="{tied_config}", tokenizer_name="tiny-llama"),
    # random-init and 4-bit: every rank builds the same quantised layers, FSDP shards them
    "qlora_seeded": dict(FSDP, model_name="tiny-llama", use_peft=True, quantization="4bit",
                         lr=5e-2),
    # DPO: LoRA under FSDP (the reference: adapters off, through the same FSDP units), full
    # fine-tuning under DDP (the reference: a frozen copy on each rank)
    "dpo_lora": dict(FSDP, **DPO, use_peft=True, lr=1e-2, dpo_beta=0.5, save_model=True),
    "dpo_ddp_full": dict(FAST, **DPO, enable_ddp=True, dpo_beta=0.5),
    # exact resume on the default path: a loader worker that prefetches, LoRA dropout,
    # accumulation; each "_resumed" case continues the case before it from its step-2 checkpoint
    **resume_pair("resume_fsdp_lora", FSDP),
    **resume_pair("resume_ddp_lora", dict(FAST, enable_ddp=True)),
}


def case_settings(name: str, model_dir: str, tied_config_dir: str) -> dict:
    """A case's settings, on ``model_dir`` unless the case names its own model."""
    kwargs = {"model_name": model_dir, **CASES[name]}
    kwargs["model_name"] = kwargs["model_name"].format(tied_config=tied_config_dir)
    return kwargs


def probe_logits(model) -> list:
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe_input()).logits.tolist()


def low_cpu_fsdp_weights(model_dir: str) -> dict:
    """Rank 0 loads, rank 1 builds on meta; after wrapping, every rank's full weights."""
    run = build_run_config(model_name=model_dir, enable_fsdp=True, low_cpu_fsdp=True)
    info, _ = setup(need_group=True)
    model = load_model(run.train, torch.float32, on_meta=not info.is_main)
    on_meta = all(p.is_meta for p in model.parameters())
    model = wrap_fsdp(model, run.fsdp, info, torch.float32, RankZeroInit(model, info))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    checksums = {k: float(v.double().sum()) for k, v in state.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"meta_before_wrap": on_meta, "checksums": checksums})
    return gathered


def low_cpu_fsdp_4bit_load(model_dir: str) -> list:
    """What each rank holds before FSDP wraps a 4-bit model under low_cpu_fsdp: rank 0 the
    full-precision weights in not-yet-quantised 4-bit layers, rank 1 the same tree on meta."""
    from llm_finetune.precision import choose_precision
    from llm_finetune.quantization import bnb_config, is_4bit_linear

    run = build_run_config(model_name=model_dir, enable_fsdp=True, low_cpu_fsdp=True,
                           use_peft=True, quantization="4bit")
    info, _ = setup(need_group=True)
    precision = choose_precision(run, cuda=False)
    model = load_model(run.train, precision.weight_dtype, on_meta=not info.is_main,
                       quantization_config=bnb_config(run, precision))
    layers = [m for m in model.modules() if is_4bit_linear(m)]
    report = {"meta_before_wrap": all(p.is_meta for p in model.parameters()),
              "linear4bit": len(layers),
              "whole_4bit_model_on_a_device": any(m.weight.bnb_quantized for m in layers)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    return gathered


def grads_after(model) -> str:
    """What the trainable weights hold as gradients after the last step: all None, all zero
    tensors (DDP's bucket views, zeroed in place), or something else."""
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    if all(g is None for g in grads):
        return "none"
    if all(g is not None and not g.any() for g in grads):
        return "zeros"
    return "other"


def main(out: str, model_dir: str, tied_dir: str, tied_config_dir: str, only: str = "") -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    for name in CASES:
        if only and name not in only.split(","):
            continue
        settings = case_settings(name, model_dir, tied_config_dir)
        if "resume_from_checkpoint" in settings:
            settings["resume_from_checkpoint"] = settings["resume_from_checkpoint"].format(out=out)
        summary = finetuning.main(**settings,
                                  output_dir=f"{out}/{name}",
                                  dist_checkpoint_root_folder=f"{out}/{name}-dcp")
        results[name] = {"losses": [m["loss"] for m in summary["metrics"] if "loss" in m],
                         "eval_loss": summary["eval_loss"], "logits": probe_logits(summary["model"]),
                         "records": summary["metrics"],
                         "grads": grads_after(summary["model"])}
    if not only or "weights" in only:
        results["low_cpu_weights"] = low_cpu_fsdp_weights(model_dir)
        results["low_cpu_weights_tied"] = low_cpu_fsdp_weights(tied_dir)
        results["low_cpu_4bit_load"] = low_cpu_fsdp_4bit_load(model_dir)
    if rank == 0:
        Path(out, "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
