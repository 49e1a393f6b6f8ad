"""Vision-language models (image-text-to-text): how to tell one from a causal LM, where its
language model and its vision parts are, and ``--freeze_LLM_only``.

transformers builds these through ``AutoModelForImageTextToText``; inside, the families that
train here (Llama 3.2 Vision's ``mllama``, LLaVA) keep their text decoder as
``model.language_model`` and their image encoder and projector beside it. Those names, not a
per-family table, are what this module looks for, so a family that keeps them trains too and
one that does not is refused naming what is missing.
"""

import re

import torch

from llm_finetune.adapters import base_model_of
from llm_finetune.errors import ConfigError

# transformers' names for a vision-language model's image side: the encoder and the projector
# into the text model's width
VISION_PARTS = ("vision_model", "vision_tower", "visual", "multi_modal_projector")
# what QLoRA leaves unquantised (as llama-recipes' users do): every module inside those parts,
# as patterns that bitsandbytes' skip list matches (transformers' should_convert_module)
UNQUANTIZED = tuple(rf"(.*\.)?{part}" for part in VISION_PARTS)
# the batch fields a vision processor adds to the text's, passed to the model's forward
VISION_INPUTS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask",
                 "cross_attention_mask", "image_sizes", "image_grid_thw",
                 "mm_token_type_ids")  # Qwen2-VL: which tokens are image tokens (its positions)


def is_vision_config(config) -> bool:
    """Whether a model config describes a vision-language model (it has a vision sub-config)."""
    return getattr(config, "vision_config", None) is not None


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The text decoder of a vision-language model (its self- and cross-attention layers)."""
    base = base_model_of(model)
    inner = getattr(base, "model", base)
    text = getattr(inner, "language_model", None)
    if text is None:
        raise ConfigError(f"{type(base).__name__} keeps no text decoder at .model.language_model"
                          ", where vision fine-tuning looks for it: this family is not supported"
                          " yet (issue #18; Llama 3.2 Vision is)")
    return text


def vision_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The image encoder and projector(s): the modules named as in ``VISION_PARTS``."""
    return [module for name, module in base_model_of(model).named_modules()
            if name.rpartition(".")[2] in VISION_PARTS]


def image_side_trains(model: torch.nn.Module) -> bool:
    """Whether any weight of the image encoder or projector trains (full fine-tuning,
    ``--freeze_LLM_only``, LoRA with ``lora_config.vision_encoder``): only then does the image
    side keep activations for backward, and only then is it worth checkpointing."""
    return any(p.requires_grad for part in vision_modules(model) for p in part.parameters())


def check_vision_model(model: torch.nn.Module) -> None:
    """A vision-language model trains here only where both its halves are found."""
    language_model(model)
    if not vision_modules(model):
        raise ConfigError(f"{type(base_model_of(model)).__name__} has no module named "
                          f"{', '.join(VISION_PARTS)}, where vision fine-tuning looks for the "
                          "image encoder: this family is not supported yet (issue #18)")


def vision_parts_pattern(model: torch.nn.Module) -> str:
    """A pattern matching the names of every module inside the image encoder and projector
    (peft's ``exclude_modules``: LoRA adapts the language model only)."""
    names = sorted({name for name, module in base_model_of(model).named_modules()
                    if name.rpartition(".")[2] in VISION_PARTS})
    return rf"(.*\.)?({'|'.join(re.escape(n) for n in names)})(\..*)?"


def lora_exclude(model: torch.nn.Module, run) -> str | None:
    """What LoRA leaves alone on a vision model (peft's ``exclude_modules``): the image encoder
    and projector, whose layers have ``target_modules``' names too (``q_proj``, ``v_proj``);
    with ``lora_config.vision_encoder`` nothing, so ``target_modules`` are adapted wherever
    they are, the image encoder's layers included (the projector is named differently)."""
    return None if run.peft.vision_encoder else vision_parts_pattern(model)


def in_vision_parts(model: torch.nn.Module) -> set[int]:
    """ids of every module inside the image encoder or projector."""
    return {id(inner) for part in vision_modules(model) for inner in part.modules()}


def freeze_llm_only(model: torch.nn.Module, layer_classes: set[type]) -> None:
    """llama-recipes' ``freeze_LLM_only``: the language model (embedding, self-attention layers,
    output layer) frozen; the image encoder, the projector and the text decoder's
    cross-attention layers (those of ``layer_classes`` named so) train."""
    check_vision_model(model)
    text = language_model(model)
    text.requires_grad_(False)
    head = base_model_of(model).get_output_embeddings()
    if head is not None:
        head.requires_grad_(False)
    cross = [m for m in text.modules()
             if type(m) in layer_classes and "CrossAttention" in type(m).__name__]
    for layer in cross:
        layer.requires_grad_(True)
    for part in vision_modules(model):
        part.requires_grad_(True)


FREEZE_LLM_ONLY_TEXT = (
    "--freeze_LLM_only freezes a vision model's language model to train its image encoder, "
    "projector and cross-attention layers (llama-recipes' Mllama recipe); {model} is a causal "
    "LM, with no vision parts. Drop it; --freeze_layers --num_freeze_layers N freezes a causal "
    "LM's first N layers")


def check_vision_settings(run, vision: bool | None) -> None:
    """What a vision-language model cannot run with yet, and vision settings on a model that
    has no vision parts. ``vision``: whether ``--model_name`` is a vision model, None when not
    known yet (a hub name before its config is read: each side's checks wait for it)."""
    t = run.train
    causal = vision is False
    if t.freeze_LLM_only and causal:
        raise ConfigError(FREEZE_LLM_ONLY_TEXT.format(model=t.model_name))
    if t.freeze_LLM_only and t.use_peft:
        raise ConfigError("--freeze_LLM_only chooses which of the model's own weights train; "
                          "with --use_peft only the adapters train. Drop one of them")
    if t.freeze_LLM_only and t.freeze_layers:
        raise ConfigError("--freeze_LLM_only and --freeze_layers both choose which weights "
                          "train: drop one of them")
    if t.use_peft and t.peft_method == "lora" and run.peft.vision_encoder and causal:
        raise ConfigError(f"--lora_config.vision_encoder adapts a vision model's image encoder "
                          f"too, and {t.model_name} is a causal LM, with none: drop it")
    if t.images_per_sample < 1:
        raise ConfigError(f"--images_per_sample {t.images_per_sample}: the memory plan's images "
                          "per row must be at least 1")
    if t.images_per_sample != 1 and causal:
        raise ConfigError(f"--images_per_sample plans a vision model's images, and "
                          f"{t.model_name} is a causal LM, with none: drop it")
    if not vision:
        return
    not_yet = {"--batching_strategy packing": t.batching_strategy == "packing",
               "--quantization 8bit": t.quantization == "8bit",
               f"--peft_method {t.peft_method}": t.use_peft and t.peft_method != "lora"}
    for setting, asked in not_yet.items():
        if asked:
            fix = (": images and text are batched whole, use --batching_strategy padding"
                   if "packing" in setting else "")
            raise ConfigError(f"{setting} does not work with a vision model ({t.model_name}) "
                              f"yet (issue #18; docs/vision.md){fix}")
