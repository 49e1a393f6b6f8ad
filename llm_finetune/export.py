"""Save what a run produced, in formats that load elsewhere, where llama-recipes puts it.

- PEFT runs: the adapter (``adapter_model.safetensors`` + ``adapter_config.json``) and the
  tokenizer directly in ``output_dir``, as llama-recipes saves it (its users pass that directory
  to ``--peft_model``): ``peft.PeftModel.from_pretrained(base, output_dir)`` loads it.
- Full fine-tuning, one process or ``checkpoint_type=FULL_STATE_DICT``: a Hugging Face model
  directory in ``output_dir/model``: ``AutoModelForCausalLM.from_pretrained(that_dir)``
  (llama-recipes writes a bare ``model.pt`` state dict instead).
- ``checkpoint_type=SHARDED_STATE_DICT`` under FSDP: a ``torch.distributed.checkpoint`` (DCP)
  directory ``<dist_checkpoint_root_folder>/<dist_checkpoint_folder>-<model name>``, every rank
  writing its own shards (no rank ever holds the full model).

Each of them holds ``train_params.yaml`` (llama-recipes' record of the settings, from which
converters read the model name). ``ModelSaver`` decides when to save: after each epoch whose
eval loss is the best so far (llama-recipes' behaviour, ``save_best``), or once at the end.

State dicts come from ``torch.distributed.checkpoint.state_dict`` (not the deprecated
``FSDP.state_dict_type``). Everything is written under a temporary name and renamed into place
once complete, so a crash never leaves a half-written model under the final name.
"""

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_state_dict)

from llm_finetune.atomic_dir import fresh_tmp_dir, publish, publish_files, tmp_dir_for
from llm_finetune.distributed import DistInfo, barrier
from llm_finetune.model import record_random_base, unwrap, weights_on_disk

TRAIN_PARAMS = "train_params.yaml"
# peft's generic model card: not written, so that one process and FSDP save the same files and
# no README of the user's output_dir is replaced
PEFT_MODEL_CARD = "README.md"


def model_dir(run) -> Path:
    """Where the final model goes: a PEFT adapter directly in ``output_dir`` (llama-recipes'
    place), full weights in ``output_dir/model``."""
    output_dir = Path(run.train.output_dir)
    return output_dir if run.train.use_peft else output_dir / "model"


def staging_dir(run) -> Path:
    """Where a PEFT adapter or Hugging Face model is written before it is moved into place."""
    return tmp_dir_for(Path(run.train.output_dir) / ("adapter" if run.train.use_peft else "model"))


def put_in_place(tmp: Path, run) -> None:
    """An adapter's files are moved into ``output_dir`` one by one (it holds the run's other
    outputs); a model directory is renamed whole."""
    tmp.joinpath(PEFT_MODEL_CARD).unlink(missing_ok=True)
    if run.train.use_peft:
        publish_files(tmp, model_dir(run))
    else:
        publish(tmp, model_dir(run))


def write_train_params(run, directory: Path) -> None:
    """``train_params.yaml`` as llama-recipes writes it: train_config and fsdp_config in one
    mapping, every value a string. Its converter, and ``convert dcp_to_hf``, read the model name
    from it."""
    values = {**vars(run.train), **vars(run.fsdp)}
    text = yaml.dump({key: str(value) for key, value in values.items()}, indent=4)
    (directory / TRAIN_PARAMS).write_text(text)


def sharded_dir(run) -> Path:
    root = run.train.dist_checkpoint_root_folder or run.train.output_dir
    model_name = Path(run.train.model_name.rstrip("/")).name
    return Path(root) / f"{run.train.dist_checkpoint_folder}-{model_name}"


def save_model(model, run, tokenizer, dist_info: DistInfo, optimizer,
               weight_dtype: torch.dtype) -> Path:
    """Save the run's result; returns where it went. All ranks must call this.
    ``weight_dtype``: what a base without weights was initialised in (recorded beside its
    adapter, see ``model.record_random_base``)."""
    t = run.train
    if t.enable_fsdp and not t.use_peft and run.fsdp.checkpoint_type == "SHARDED_STATE_DICT":
        return save_sharded(model, optimizer if t.save_optimizer else None, run, dist_info)
    final = model_dir(run)

    def finish(tmp: Path) -> None:  # rank 0: what every saved model holds, then into place
        tokenizer.save_pretrained(tmp)
        write_train_params(run, tmp)
        if t.use_peft and not weights_on_disk(t):
            record_random_base(tmp, t, weight_dtype)
        put_in_place(tmp, run)

    if not t.enable_fsdp and t.use_peft:  # peft's own writer (works for 4/8-bit bases too)
        if dist_info.is_main:
            tmp = fresh_tmp_dir(staging_dir(run))
            model.save_pretrained(tmp)
            if optimizer is not None and t.save_optimizer:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            finish(tmp)
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
        tmp = fresh_tmp_dir(staging_dir(run))
        if t.use_peft:
            save_fsdp_adapter(unwrap(model), state, tmp)
        else:
            unwrap(model).save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if optimizer is not None and t.save_optimizer:
            _, optim_state = get_state_dict(model, optimizer, options=options)
            torch.save(optim_state, tmp / "optimizer.pt")
        finish(tmp)
    elif optimizer is not None and t.save_optimizer:
        get_state_dict(model, optimizer, options=options)  # collective: every rank takes part
    barrier()
    return final


class ModelSaver:
    """Saves the run's model when llama-recipes does. With ``save_best`` and validation: after
    each epoch whose eval loss is the lowest so far (``Trainer.new_best``), so the best epoch's
    model remains whatever later epochs do; otherwise once, at the end. All ranks call it.
    ``tokenizer``: or a vision model's processor, saved whole (tokenizer, image processor, chat
    template) so that ``AutoProcessor`` loads the result."""

    def __init__(self, run, model, tokenizer, dist_info: DistInfo, optimizer,
                 weight_dtype: torch.dtype):
        self.run = run
        self.model = model
        self.tokenizer = tokenizer
        self.dist = dist_info
        self.optimizer = optimizer
        self.weight_dtype = weight_dtype
        self.saved_to: Path | None = None

    @property
    def saves_best_epochs(self) -> bool:
        t = self.run.train
        return t.save_model and t.save_best and t.run_validation

    def save(self) -> Path:
        self.saved_to = save_model(self.model, self.run, self.tokenizer, self.dist,
                                   self.optimizer, self.weight_dtype)
        return self.saved_to

    def epoch_end(self, trainer) -> None:
        """After an epoch and its evaluation: save if its eval loss is the best so far."""
        if not (self.saves_best_epochs and trainer.new_best):
            return
        self.save()
        if self.dist.is_main:
            print(f"epoch {trainer.best_epoch}: eval loss {trainer.best_eval_loss:.4f} is the "
                  f"lowest so far: model saved to {self.saved_to}", flush=True)

    def finish(self) -> Path | None:
        """At the end of training: the final model, unless the best epoch's is saved already;
        returns where the model is (None: not saved by this run)."""
        if self.run.train.save_model and not self.saves_best_epochs:
            self.save()
        return self.saved_to


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


def save_sharded(model, optimizer, run, dist_info: DistInfo) -> Path:
    """Every rank writes its shards with DCP; rank 0 adds ``train_params.yaml`` (where
    llama-recipes' converter looks for it) and publishes the directory."""
    final = sharded_dir(run)
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
        write_train_params(run, tmp)
        publish(tmp, final)
    barrier()
    return final
