"""PEFT: build the adapter config from ours and wrap the model exactly once."""

import dataclasses
import warnings
from pathlib import Path

import torch

from peft import (AdaptionPromptConfig, LoraConfig, PeftModel, PrefixTuningConfig,
                  get_peft_model)

from llm_finetune.errors import ConfigError

# peft asks every model it wraps for ``is_gradient_checkpointing``, which transformers 5.2x
# deprecates with a FutureWarning on each LoRA run: peft's to change, nothing a user can act on
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                        category=FutureWarning)


def peft_config(run, num_layers: int, exclude: str | None = None):
    """``exclude``: a pattern of module names LoRA leaves alone (a vision model's image side)."""
    method = run.train.peft_method
    fields = dataclasses.asdict(run.peft)
    if method == "lora":
        fields.pop("vision_encoder")  # ours, already in ``exclude`` (vision.lora_exclude)
        return LoraConfig(**fields, exclude_modules=exclude)
    if method == "llama_adapter":
        fields["adapter_layers"] = min(fields["adapter_layers"], num_layers)
        return AdaptionPromptConfig(**fields)
    return PrefixTuningConfig(**fields)


def apply_peft(model, run, num_layers: int, adapter_dtype: torch.dtype = torch.float32,
               exclude: str | None = None) -> PeftModel:
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
        model = get_peft_model(model, peft_config(run, num_layers, exclude))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.to(adapter_dtype)
    return model


def base_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT model (the model itself when it has no adapters)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def check_adapter_settings(run) -> None:
    """What each PEFT method cannot run with, and adapters to continue that are not there."""
    t, f = run.train, run.fsdp
    if t.from_peft_checkpoint and not t.use_peft:
        raise ConfigError("--from_peft_checkpoint continues training saved adapters: add --use_peft")
    if t.from_peft_checkpoint and not Path(t.from_peft_checkpoint).is_dir():
        raise ConfigError(f"--from_peft_checkpoint {t.from_peft_checkpoint}: no such directory")
    if t.freeze_layers and t.use_peft:
        raise ConfigError("--freeze_layers is for full fine-tuning; with --use_peft only the "
                          "adapters train already. Drop one of them.")
    if t.use_peft and t.peft_method == "prefix" and f.fsdp_activation_checkpointing:
        raise ConfigError("prefix tuning feeds its virtual tokens to the model as a KV cache, "
                          "which transformers drops in checkpointed layers (the attention mask "
                          "then no longer matches). Add --fsdp_config.fsdp_activation_checkpointing "
                          "False, or use --peft_method lora")
    if t.use_peft and t.peft_method == "prefix" and t.batching_strategy == "packing":
        raise ConfigError("prefix tuning with --batching_strategy packing would let packed "
                          "samples attend to each other: the virtual tokens arrive as a KV cache, "
                          "and transformers builds the samples-apart mask only without one. Use "
                          "--batching_strategy padding, or --peft_method lora")
