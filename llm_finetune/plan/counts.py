"""What the planner plans for: the model's parameter counts and shapes, exact and free.

The model is built on the meta device from its config (no weights read, no memory used), with
the run's adapters applied, and counted: all parameters, the trainable ones, the frozen linear
weights that quantisation packs, one decoder layer (an FSDP unit) and what lies outside the
layers, plus the widths the activation model needs. Everything else in the planner starts from
these counts.

A vision-language model (Llama 3.2 Vision) adds its image side (``VisionCounts``): the image
encoder's widths and layers, how many tokens one image becomes in the encoder and in the text
decoder's cross-attention layers, and whether anything on the image side trains (when nothing
does, the encoder keeps no activations for backward).
"""

import math
from dataclasses import dataclass

import torch

from llm_finetune.adapters import apply_peft
from llm_finetune.errors import ConfigError
from llm_finetune.model import decoder_layers, meta_model, model_config, text_layers
from llm_finetune.vision import (freeze_llm_only, image_side_trains, in_vision_parts,
                                 is_vision_config, lora_exclude)


@dataclass
class VisionCounts:
    """The image side of a vision-language model (Llama 3.2 Vision's ``vision_config``), per
    image of the most tiles (the plan counts ``--images_per_sample`` per sequence)."""
    layers: int  # image encoder layers (local and global)
    hidden: int
    intermediate: int
    output_dim: int  # what the projector reads per image token (layers' outputs stacked)
    tiles: int  # tiles per image, at most
    encoder_tokens: int  # per image in the encoder: tiles x (patches + class token), padded
    image_tokens: int  # per image in the cross-attention layers: tiles x (patches + 1)
    pixels: int  # per image: tiles x channels x tile height x width
    cross_layers: tuple[int, ...]  # indices of the text decoder's cross-attention layers
    trains: bool  # whether any weight of the encoder or projector trains


@dataclass
class ModelCounts:
    """Parameter counts of the model as the run will train it."""
    total: int
    trainable: int
    quantizable: int  # frozen nn.Linear weights inside decoder layers (what bitsandbytes packs)
    largest_layer: int  # parameters of one decoder layer (an FSDP unit)
    outside_layers: int  # embeddings, final norm, lm_head (FSDP's root unit)
    num_layers: int  # of the text decoder
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    supports_checkpointing: bool
    vision: VisionCounts | None = None  # a vision-language model's image side


# what the activation model reads of an image side: Llama 3.2 Vision's tiles and projector width
# (vision_config) and its cross-attention layers (text config)
PLANNED_VISION_FIELDS = ("image_size", "patch_size", "vision_output_dim", "max_num_tiles")


def check_planned_vision(config) -> None:
    """The planner models Llama 3.2 Vision's image side (tiles, cross-attention over image
    tokens); another family's (LLaVA's image tokens in the text, Qwen2-VL's merged patches) is
    refused naming what its config lacks, instead of a plan that counts the wrong thing."""
    missing = [f"vision_config.{field}" for field in PLANNED_VISION_FIELDS
               if not hasattr(config.vision_config, field)]
    if not hasattr(config.get_text_config(), "cross_attention_layers"):
        missing.append("cross_attention_layers")
    if missing:
        raise ConfigError(
            f"the memory planner models Llama 3.2 Vision's (mllama) image side, and "
            f"{config.model_type}'s config has no {', '.join(missing)}: its memory is not planned "
            "yet (issue #18): choose --batch_size_training, --context_length and "
            "checkpointing by hand (--dry_run and --auto_fit cannot plan it)")


def vision_counts(config, model, layers: list) -> VisionCounts:
    """Llama 3.2 Vision's image side from its config: each tile is cut into patches plus a
    class token, which the encoder pads to a multiple of 8 and the projector drops again."""
    v = config.vision_config
    per_tile = (v.image_size // v.patch_size) ** 2 + 1
    image_side = in_vision_parts(model)
    return VisionCounts(
        layers=sum(1 for layer in layers if id(layer) in image_side),
        hidden=v.hidden_size, intermediate=v.intermediate_size,
        output_dim=v.vision_output_dim, tiles=v.max_num_tiles,
        encoder_tokens=v.max_num_tiles * math.ceil(per_tile / 8) * 8,
        image_tokens=v.max_num_tiles * per_tile,
        pixels=v.max_num_tiles * v.num_channels * v.image_size ** 2,
        cross_layers=tuple(config.get_text_config().cross_attention_layers),
        trains=image_side_trains(model))


def count_parameters(run) -> ModelCounts:
    """Exact counts from the model built on the meta device, with the run's adapters (the
    run's own printout, ``metrics.report_parameter_counts``, scales a rank's shard)."""
    config = model_config(run.train.model_name)
    vision = is_vision_config(config)
    if vision:
        check_planned_vision(config)
    model = meta_model(config, torch.float32, "sdpa")
    layers = decoder_layers(model)  # every FSDP unit: an image encoder's layers too
    text = text_layers(model)
    supports_checkpointing = model.supports_gradient_checkpointing
    if run.train.use_peft:  # as the run applies them (finetuning.build_model)
        model = apply_peft(model, run, len(text),
                           exclude=lora_exclude(model, run) if vision else None)
    else:
        model.requires_grad_(True)
    if run.train.freeze_LLM_only:
        freeze_llm_only(model, {type(layer) for layer in layers})
    unique = {id(p): p for p in model.parameters()}.values()
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    quantizable = sum(m.weight.numel() for layer in text for m in layer.modules()
                      if type(m) is torch.nn.Linear and not m.weight.requires_grad)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return ModelCounts(
        total=sum(p.numel() for p in unique),
        trainable=sum(p.numel() for p in unique if p.requires_grad),
        quantizable=quantizable,
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        outside_layers=sum(p.numel() for p in unique if id(p) not in in_layers),
        num_layers=len(text),
        hidden=text_config.hidden_size,
        intermediate=getattr(text_config, "intermediate_size", 4 * text_config.hidden_size),
        kv_dim=getattr(text_config, "num_key_value_heads", heads) * head_dim,
        vocab=text_config.vocab_size,
        supports_checkpointing=supports_checkpointing,
        vision=vision_counts(config, model, layers) if vision else None)
