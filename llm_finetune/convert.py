"""Turn what a run saved into a standalone Hugging Face model directory, on one machine without
GPUs and without a process group.

    python -m llm_finetune.convert dcp_to_hf --checkpoint DIR --output OUT [--model_name BASE]
    python -m llm_finetune.convert merge_adapters --model_name BASE --adapter DIR --output OUT
    python -m llm_finetune.convert hf_to_dcp --model_name BASE --output DIR

``dcp_to_hf`` reads a sharded checkpoint (``<dist_checkpoint_folder>-<model>/`` or a training
checkpoint ``checkpoints/step-N/`` of a full fine-tune) one output shard at a time: no model is
built and at most one shard of tensors is in memory. ``hf_to_dcp`` goes the other way. ``merge_adapters`` folds a LoRA
adapter into its base (``peft``'s ``merge_and_unload``). Both write safetensors shards of at
most 5 GB, the config, generation config and tokenizer (a vision model's processor: its
tokenizer, image processor and chat template, so that ``AutoProcessor`` loads the result).
"""

import json
import math
import sys
from pathlib import Path

import fire
import torch
import yaml
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, GenerationConfig

from llm_finetune.checkpoint_files import MANIFEST
from llm_finetune.errors import ConfigError
from llm_finetune.export import TRAIN_PARAMS
from llm_finetune.model import (auto_class, fit_embeddings_to_tokenizer, load_base_model,
                                resolve_model_path)
from llm_finetune.vision import is_vision_config


def text_side(config, source: str):
    """What reads a model's text: its tokenizer, or for a vision model its processor (which
    holds the tokenizer and adds the image processor and chat template)."""
    return (AutoProcessor if is_vision_config(config) else AutoTokenizer).from_pretrained(source)


def _save(model, tokenizer_source: str, output: str) -> str:
    model.save_pretrained(output, max_shard_size="5GB", safe_serialization=True)
    text_side(model.config, tokenizer_source).save_pretrained(output)
    print(f"saved a Hugging Face model to {output}", flush=True)
    return output


def _shard_groups(names: list[str], sizes: dict[str, int], limit: int) -> list[list[str]]:
    groups, current, used = [], [], 0
    for name in names:
        if current and used + sizes[name] > limit:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    return groups + [current] if current else groups


def recorded_names(checkpoint: str) -> tuple[str, str]:
    """(model name, tokenizer name) the run recorded in a checkpoint: in ``train_params.yaml``
    (a final sharded save; where llama-recipes' converter reads it) or in ``MANIFEST.json`` (a
    training checkpoint); empty strings when neither says."""
    params, manifest = Path(checkpoint) / TRAIN_PARAMS, Path(checkpoint) / MANIFEST
    if params.is_file():
        recorded = yaml.safe_load(params.read_text()) or {}
        return recorded.get("model_name", ""), recorded.get("tokenizer_name", "")
    if manifest.is_file():
        return json.loads(manifest.read_text()).get("model_name", ""), ""
    return "", ""


def dcp_to_hf(checkpoint: str, model_name: str = "", output: str = "", dtype: str = "bfloat16",
              max_shard_gb: float = 5.0, tokenizer_name: str = "") -> str:
    """``model_name``: the base model (hub name, directory or built-in) the run trained, for its
    config and tokenizer (``tokenizer_name`` when the run named one: a config-only model
    directory has none); by default the names the run recorded in the checkpoint
    (``train_params.yaml``, as llama-recipes' converter reads them). ``dtype``: of the written
    weights.

    Streams: reads the checkpoint's index, then loads one output shard's tensors at a time
    (DCP loads any subset of a checkpoint's keys) and writes it, so converting a 70B model
    needs about one shard (5 GB) of memory, not the model."""
    if not (Path(checkpoint) / ".metadata").is_file():
        raise SystemExit(f"{checkpoint}: not a torch.distributed.checkpoint directory "
                         "(no .metadata)")
    if not output:
        raise SystemExit("dcp_to_hf needs --output DIR, where the Hugging Face model goes")
    if not model_name:
        model_name, recorded_tokenizer = recorded_names(checkpoint)
        tokenizer_name = tokenizer_name or recorded_tokenizer
        if not model_name:
            raise SystemExit(f"{checkpoint} does not record its model ({TRAIN_PARAMS}): give "
                             "--model_name, the base model the run trained")
        print(f"model {model_name} (from {checkpoint})", flush=True)
    path = resolve_model_path(model_name)
    config = AutoConfig.from_pretrained(path)
    out_dtype = getattr(torch, dtype)
    stored = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    tensors = {key[len("model."):]: meta for key, meta in stored.items()
               if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    if not tensors:
        raise SystemExit(f"{checkpoint} holds no model tensors (a PEFT run's checkpoint holds "
                         "only its adapter: use merge_adapters)")
    if getattr(config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # saved once, as the input embedding
    config.get_text_config().vocab_size = vocab_size(config, tensors)
    itemsize = torch.empty(0, dtype=out_dtype).element_size()
    sizes = {name: math.prod(meta.size) * itemsize for name, meta in tensors.items()}
    groups = _shard_groups(sorted(tensors), sizes, int(max_shard_gb * 2**30))
    Path(output).mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for index, names in enumerate(groups, start=1):
        file = ("model.safetensors" if len(groups) == 1
                else f"model-{index:05d}-of-{len(groups):05d}.safetensors")
        shard = {name: torch.empty(tensors[name].size, dtype=tensors[name].properties.dtype)
                 for name in names}
        dcp.load({"model": shard}, checkpoint_id=checkpoint, no_dist=True)
        save_file({n: t.to(out_dtype).contiguous() for n, t in shard.items()},
                  str(Path(output) / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        del shard
    if len(groups) > 1:
        (Path(output) / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
            indent=2))
    config.dtype = out_dtype
    config.save_pretrained(output)
    try:
        GenerationConfig.from_pretrained(path).save_pretrained(output)
    except OSError:
        GenerationConfig.from_model_config(config).save_pretrained(output)
    tokenizer = resolve_model_path(tokenizer_name) if tokenizer_name else path
    try:
        text_side(config, tokenizer).save_pretrained(output)
    except (OSError, ValueError):
        print(f"note: no tokenizer in {tokenizer}; the model is written without one (pass "
              "--tokenizer_name, the run's tokenizer)", flush=True)
    print(f"saved a Hugging Face model ({len(groups)} shard(s)) to {output}", flush=True)
    return output


def vocab_size(config, tensors: dict) -> int:
    """The ``vocab_size`` of the checkpoint's model: more than the base's when the run grew the
    input embedding to a tokenizer with added tokens (``model.fit_embeddings_to_tokenizer``),
    by as many rows. (Not the rows themselves: Llama 3.2 Vision's text model keeps 8 rows
    beyond its ``vocab_size`` for image tokens.)"""
    text_config = config.get_text_config()
    with torch.device("meta"):
        model = auto_class(config).from_config(config)
    weight = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is weight)
    if name not in tensors:
        return text_config.vocab_size
    return text_config.vocab_size + tensors[name].size[0] - weight.shape[0]


def hf_to_dcp(model_name: str, output: str, dtype: str = "bfloat16") -> str:
    """A Hugging Face model as a DCP checkpoint, in the layout of a run's SHARDED_STATE_DICT save
    (``{"model": state_dict}``): what ``dcp_to_hf`` reads back, and what DCP loads into a model
    sharded over any number of ranks."""
    path = resolve_model_path(model_name)
    model = auto_class(AutoConfig.from_pretrained(path)).from_pretrained(
        path, dtype=getattr(torch, dtype))
    dcp.save({"model": model.state_dict()}, checkpoint_id=output, no_dist=True)
    print(f"saved a torch.distributed.checkpoint of {model_name} to {output}", flush=True)
    return output


def merge_adapters(model_name: str, adapter: str, output: str, dtype: str = "bfloat16") -> str:
    """Load the base in ``dtype`` (a 4-bit QLoRA base is loaded unquantised), apply the adapter,
    merge it into the weights and save a model that needs no peft."""
    from peft import PeftModel

    path = resolve_model_path(model_name)
    tokenizer = adapter if (Path(adapter) / "tokenizer_config.json").is_file() else path
    base = load_base_model(model_name, getattr(torch, dtype), adapter)
    # a run with added tokens grew the embedding, which its adapter then holds
    text = text_side(base.config, tokenizer)
    fit_embeddings_to_tokenizer(base, getattr(text, "tokenizer", text), verbose=False)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    return _save(merged, tokenizer, output)


if __name__ == "__main__":
    try:
        fire.Fire({"dcp_to_hf": dcp_to_hf, "hf_to_dcp": hf_to_dcp, "merge_adapters": merge_adapters})
    except ConfigError as error:  # a model that is not there: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
