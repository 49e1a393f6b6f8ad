"""Turn what a run saved into a standalone Hugging Face model directory, on one machine without
GPUs and without a process group.

    python -m llm_finetune.convert dcp_to_hf --checkpoint DIR --model_name BASE --output OUT
    python -m llm_finetune.convert merge_adapters --model_name BASE --adapter DIR --output OUT

``dcp_to_hf`` reads a sharded checkpoint (``<dist_checkpoint_folder>-<model>/`` or a training
checkpoint ``checkpoints/step-N/`` of a full fine-tune) straight into an empty model skeleton:
one copy of the weights in memory, no random initialisation. ``merge_adapters`` folds a LoRA
adapter into its base (``peft``'s ``merge_and_unload``). Both write safetensors shards of at
most 5 GB, the config, generation config and tokenizer.
"""

from pathlib import Path

import fire
import torch
import torch.distributed.checkpoint as dcp
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llm_finetune.model import resolve_model_path


def _save(model, tokenizer_source: str, output: str) -> str:
    model.save_pretrained(output, max_shard_size="5GB", safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(output)
    print(f"saved a Hugging Face model to {output}", flush=True)
    return output


def dcp_to_hf(checkpoint: str, model_name: str, output: str, dtype: str = "bfloat16") -> str:
    """``model_name``: the base model (hub name, directory or built-in) the run trained, for its
    config and tokenizer; ``dtype``: of the written weights."""
    if not (Path(checkpoint) / ".metadata").is_file():
        raise SystemExit(f"{checkpoint}: not a torch.distributed.checkpoint directory "
                         "(no .metadata)")
    path = resolve_model_path(model_name)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.to_empty(device="cpu")
    model.tie_weights()
    state = {"model": model.state_dict()}
    dcp.load(state, checkpoint_id=checkpoint, no_dist=True)  # fills the tensors in place
    return _save(model, path, output)


def merge_adapters(model_name: str, adapter: str, output: str, dtype: str = "bfloat16") -> str:
    """Load the base in ``dtype`` (a 4-bit QLoRA base is loaded unquantised), apply the adapter,
    merge it into the weights and save a model that needs no peft."""
    from peft import PeftModel

    path = resolve_model_path(model_name)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    return _save(merged, adapter if (Path(adapter) / "tokenizer_config.json").is_file() else path,
                 output)


if __name__ == "__main__":
    fire.Fire({"dcp_to_hf": dcp_to_hf, "merge_adapters": merge_adapters})
