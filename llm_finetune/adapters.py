"""PEFT: build the adapter config from ours and wrap the model exactly once."""

import dataclasses

import torch

from peft import (AdaptionPromptConfig, LoraConfig, PeftModel, PrefixTuningConfig,
                  get_peft_model)


def peft_config(run, num_layers: int):
    method = run.train.peft_method
    fields = dataclasses.asdict(run.peft)
    if method == "lora":
        return LoraConfig(**fields)
    if method == "llama_adapter":
        fields["adapter_layers"] = min(fields["adapter_layers"], num_layers)
        return AdaptionPromptConfig(**fields)
    return PrefixTuningConfig(**fields)


def apply_peft(model, run, num_layers: int, adapter_dtype: torch.dtype = torch.float32) -> PeftModel:
    """New adapters, or the saved ones of ``from_peft_checkpoint``, trainable.

    ``adapter_dtype``: the trainable weights' dtype (``Precision.trainable_dtype``): fp32
    masters over a base stored in the compute dtype, or bf16 with ``pure_bf16``. Under FSDP
    the adapters sit in units of their own, so their dtype may differ from the base's.

    Wrapping a model that already has adapters nests them and silently trains the wrong
    weights (a common trap with ``get_peft_model`` called twice), so that is an error.
    """
    if isinstance(model, PeftModel) or getattr(model, "peft_config", None):
        raise ValueError("the model already carries PEFT adapters; get_peft_model must be applied "
                         "once. Pass the base model, or continue with --from_peft_checkpoint")
    if run.train.from_peft_checkpoint:
        model = PeftModel.from_pretrained(model, run.train.from_peft_checkpoint, is_trainable=True)
    else:
        model = get_peft_model(model, peft_config(run, num_layers))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(adapter_dtype)
    return model


def base_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT model (the model itself when it has no adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
