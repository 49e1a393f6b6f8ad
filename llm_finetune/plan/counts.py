"""What the planner plans for: the model's parameter counts and shapes, exact and free.

The model is built on the meta device from its config (no weights read, no memory used), with
the run's adapters applied, and counted: all parameters, the trainable ones, the frozen linear
weights that quantisation packs, one decoder layer (an FSDP unit) and what lies outside the
layers, plus the widths the activation model needs. Everything else in the planner starts from
these counts.
"""

from dataclasses import dataclass

import torch

from llm_finetune.adapters import apply_peft
from llm_finetune.model import decoder_layers, meta_model, model_config


@dataclass
class ModelCounts:
    """Parameter counts of the model as the run will train it."""
    total: int
    trainable: int
    quantizable: int  # frozen nn.Linear weights inside decoder layers (what bitsandbytes packs)
    largest_layer: int  # parameters of one decoder layer (an FSDP unit)
    outside_layers: int  # embeddings, final norm, lm_head (FSDP's root unit)
    num_layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    supports_checkpointing: bool


def count_parameters(run) -> ModelCounts:
    """Exact counts from the model built on the meta device, with the run's adapters (the
    run's own printout, ``metrics.report_parameter_counts``, scales a rank's shard)."""
    config = model_config(run.train.model_name)
    model = meta_model(config, torch.float32, "sdpa")
    layers = decoder_layers(model)
    supports_checkpointing = model.supports_gradient_checkpointing
    if run.train.use_peft:
        model = apply_peft(model, run, len(layers))
    else:
        model.requires_grad_(True)
    unique = {id(p): p for p in model.parameters()}.values()
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    quantizable = sum(m.weight.numel() for layer in layers for m in layer.modules()
                      if type(m) is torch.nn.Linear and not m.weight.requires_grad)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelCounts(
        total=sum(p.numel() for p in unique),
        trainable=sum(p.numel() for p in unique if p.requires_grad),
        quantizable=quantizable,
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        outside_layers=sum(p.numel() for p in unique if id(p) not in in_layers),
        num_layers=len(layers),
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        kv_dim=getattr(text, "num_key_value_heads", heads) * head_dim,
        vocab=text.vocab_size,
        supports_checkpointing=supports_checkpointing)
