"""Run under ``torchrun --nproc_per_node 2`` by tests/test_vision.py: tiny-mllama (and a tiny
LLaVA) under FSDP, one run per case in one launch; rank 0 writes each case's per-step losses to
OUT/results.json."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llm_finetune import finetuning
from llm_finetune.config_utils import build_run_config
from llm_finetune.configs.recipes import RECIPES
from llm_finetune.model import load_model, load_processor

# each case's settings beside the shared ones (tests/test_vision.py fsdp_settings)
VISION_CASES = {"full": {}, "lora": {"use_peft": True},
                "freeze_LLM_only": {"freeze_LLM_only": True},
                "vision_lora": {"use_peft": True, "lora_config.vision_encoder": True},
                "qlora": {"use_peft": True, "quantization": "4bit"},
                # preference pairs about the same images (tools/make_colour_images.py)
                "dpo_lora": {"use_peft": True, "method": "dpo",
                             "file_dataset.data_files": "{rows_dir}/pairs.jsonl"},
                # tools/make_tiny_vlms.py's LLaVA beside the rows (a CLIP encoder's layers and a
                # Llama decoder's as units); a directory brings no recipe: tiny-mllama's settings
                "llava": {"model_name": "{rows_dir}/tiny-llava", "batching_strategy": "padding",
                          "context_length": 512, "lr": 1e-3}}
# what a run leaves: the model as transformers weights (FULL_STATE_DICT) and as the same run's
# DCP shards (SHARDED_STATE_DICT, for convert dcp_to_hf); training checkpoints of a LoRA run on
# the default path (a loader worker, dropout), and that run resumed from its step 2
CHECKPOINT_CASES = {
    "full_state_dict": {"save_model": True, "fsdp_config.checkpoint_type": "FULL_STATE_DICT"},
    "sharded_state_dict": {"save_model": True,
                           "fsdp_config.checkpoint_type": "SHARDED_STATE_DICT"},
    "lora_default_path": {"use_peft": True, "num_workers_dataloader": 1,
                          "lora_config.lora_dropout": 0.05, "gradient_accumulation_steps": 2,
                          "max_train_step": 8, "run_validation": False, "save_steps": 2},
}
CHECKPOINT_CASES["lora_default_path_resumed"] = dict(
    CHECKPOINT_CASES["lora_default_path"],
    resume_from_checkpoint="{out}/lora_default_path/checkpoints/step-00000002")
# llama-recipes' --low_cpu_fsdp: rank 0 reads the weights, the other ranks build the model on
# the meta device and receive theirs; the weights are tiny-mllama's seeded ones saved to disk
# (write_weights), so the losses equal the "full" case's; a directory brings no recipe:
# tiny-mllama's is given where the shared settings leave it
LOADING_CASES = {"low_cpu_fsdp": {
    "low_cpu_fsdp": True, "model_name": "{out}/weights",
    **{key: RECIPES["tiny-mllama"][key] for key in ("batching_strategy", "context_length", "lr")}}}


def write_weights(out: str) -> None:
    """tiny-mllama's seeded random weights and its processor in OUT/weights, by rank 0."""
    if dist.get_rank() == 0:
        run = build_run_config(model_name="tiny-mllama")
        model = load_model(run.train, torch.float32, on_meta=False)
        model.save_pretrained(f"{out}/weights")
        load_processor(run.train).save_pretrained(f"{out}/weights")
    dist.barrier()


def fsdp_settings(rows: str, case: str, out: str = "") -> dict:
    """A case's settings: paths are the rows' directory and the launch's output directory."""
    settings = {"model_name": "tiny-mllama", "dataset": "file_dataset",
                "file_dataset.data_files": rows, "batch_size_training": 2, "val_batch_size": 2,
                "num_workers_dataloader": 0, "plot_metrics": False, "num_epochs": 1,
                "max_train_step": 4, "max_eval_step": 2, "save_model": False,
                "lora_config.lora_dropout": 0.0,
                **{**VISION_CASES, **CHECKPOINT_CASES, **LOADING_CASES}[case]}
    for key in ("file_dataset.data_files", "model_name", "resume_from_checkpoint"):
        if key in settings:
            settings[key] = settings[key].format(rows_dir=Path(rows).parent, out=out)
    return settings


def main(out: str, rows: str) -> None:
    dist.init_process_group("gloo")  # one group for every case: finetuning.main reuses it
    write_weights(out)
    # how each rank built the model (on the meta device or not), per loading case
    built_on_meta, load_model_of_run = [], finetuning.load_model

    def recording_load_model(*args, **kwargs):
        built_on_meta.append(bool(kwargs.get("on_meta")))
        return load_model_of_run(*args, **kwargs)

    finetuning.load_model = recording_load_model
    results = {"on_meta": {}}
    for case in [*VISION_CASES, *CHECKPOINT_CASES, *LOADING_CASES]:
        settings = fsdp_settings(rows, case, out)
        built_on_meta.clear()
        summary = finetuning.main(**settings, enable_fsdp=True, output_dir=f"{out}/{case}")
        results[case] = [record["loss"] for record in summary["metrics"] if "loss" in record]
        if case in LOADING_CASES:
            ranks = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, list(built_on_meta))
            results["on_meta"][case] = ranks
    if dist.get_rank() == 0:
        Path(out, "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
