"""Save what a run produced, in formats that load elsewhere.

- PEFT runs: the adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and the
  tokenizer in ``output_dir/model``: ``peft.PeftModel.from_pretrained(base, that_dir)`` loads it.
- Full fine-tuning, one process or ``checkpoint_type=FULL_STATE_DICT``: a Hugging Face model
  directory in ``output_dir/model``: ``AutoModelForCausalLM.from_pretrained(that_dir)``.
- ``checkpoint_type=SHARDED_STATE_DICT`` under FSDP: a ``torch.distributed.checkpoint`` (DCP)
  directory ``<dist_checkpoint_root_folder>/<dist_checkpoint_folder>-<model name>``, every rank
  writing its own shards (no rank ever holds the full model).

State dicts come from ``torch.distributed.checkpoint.state_dict`` (not the deprecated
``FSDP.state_dict_type``). Every directory is written under a temporary name and renamed into
place once complete, so a crash never leaves a half-written checkpoint under the final name.
"""

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict)

from llm_finetune.atomic_dir import fresh_tmp_dir, publish, tmp_dir_for
from llm_finetune.distributed import DistInfo, barrier
from llm_finetune.model import unwrap


def model_dir(run) -> Path:
    return Path(run.train.output_dir) / "model"


def sharded_dir(run) -> Path:
    root = run.train.dist_checkpoint_root_folder or run.train.output_dir
    model_name = Path(run.train.model_name.rstrip("/")).name
    return Path(root) / f"{run.train.dist_checkpoint_folder}-{model_name}"


def save_model(model, run, tokenizer, dist_info: DistInfo, optimizer=None) -> Path:
    """Save the run's result; returns where it went. All ranks must call this."""
    t = run.train
    if t.enable_fsdp and not t.use_peft and run.fsdp.checkpoint_type == "SHARDED_STATE_DICT":
        return save_sharded(model, optimizer if t.save_optimizer else None, sharded_dir(run),
                            dist_info)
    final = model_dir(run)
    if not t.enable_fsdp and t.use_peft:  # peft's own writer (works for 4/8-bit bases too)
        if dist_info.is_main:
            tmp = fresh_tmp_dir(final)
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if optimizer is not None and t.save_optimizer:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            publish(tmp, final)
        return final
    # Full model: gathered to rank 0 only, moved to CPU as it arrives (not on a CPU-only run:
    # the tensors are there already, and FSDP's offload path crashes there). PEFT: only the
    # small trainable adapter, on every rank (rank-0-only gathering together with
    # ignore_frozen_params fails on the other ranks, whose state dict is empty).
    options = StateDictOptions(full_state_dict=True,
                               cpu_offload=dist_info.device.type != "cpu" and not t.use_peft,
                               ignore_frozen_params=t.use_peft)
    state = get_model_state_dict(model, options=options)
    if dist_info.is_main:
        tmp = fresh_tmp_dir(final)
        if t.use_peft:
            save_fsdp_adapter(unwrap(model), state, tmp)
        else:
            unwrap(model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if optimizer is not None and t.save_optimizer:
            _, optim_state = get_state_dict(model, optimizer, options=options)
            torch.save(optim_state, tmp / "optimizer.pt")
        publish(tmp, final)
    elif optimizer is not None and t.save_optimizer:
        get_state_dict(model, optimizer, options=options)  # collective: every rank takes part
    barrier()
    return final


def save_fsdp_adapter(peft_model, trainable_state: dict, directory: Path) -> None:
    """Write a PEFT adapter directory from the gathered trainable parameters.

    ``PeftModel.save_pretrained`` finds adapter weights by walking the model's modules, whose
    names under FSDP carry ``_fsdp_wrapped_module``; it then saves an *empty* adapter. The
    gathered state dict already has clean names, so we only drop the adapter name from the keys
    (as peft does) and write the same two files peft writes.
    """
    from safetensors.torch import save_file

    name = peft_model.active_adapter
    config = peft_model.peft_config[name]
    if config.is_prompt_learning:  # peft stores the virtual-token table under one fixed key
        (table,) = [v for k, v in trainable_state.items() if k.endswith("embedding.weight")]
        state = {"prompt_embeddings": table.contiguous()}
    else:
        state = {key.replace(f".{name}.", "."): tensor.contiguous()
                 for key, tensor in trainable_state.items()}
    save_file(state, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(directory))


def save_sharded(model, optimizer, final: Path, dist_info: DistInfo) -> Path:
    """Every rank writes its shards with DCP; rank 0 publishes the directory."""
    tmp = tmp_dir_for(final)
    if dist_info.is_main:
        fresh_tmp_dir(final)
    barrier()
    if optimizer is not None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
    else:
        state = {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=str(tmp))
    barrier()
    if dist_info.is_main:
        publish(tmp, final)
    barrier()
    return final
