"""Levers measured, not shipped (issue 17): ``python -m llm_finetune.finetuning`` with one or
both of them patched in where ``--torch_compile True`` compiles the decoder layers, after
activation checkpointing is set up. ``LEVER`` (environment, comma-separated) picks them:

- ``decoder_compile``: ``torch.compile`` the whole decoder (embedding, every layer, final norm)
  as one module, instead of each layer on its own;
- ``float8``: torchao's float8 training on the decoder layers' linears, frozen ones included,
  then the layers compiled as usual: for LoRA, which ``--float8`` refuses (docs/performance.md
  says why). Not together with ``--float8``, which converts the trained ones already.

    LEVER=decoder_compile python benchmarks/with_lever.py --torch_compile True ...

benchmarks/levers.py runs them against the plain compiled layers (docs/performance.md).
"""

import os

import torch

from llm_finetune import finetuning
from llm_finetune.engine import compile_layers
from llm_finetune.model import decoder_layers


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``layers`` list holds the decoder layers (LlamaModel)."""
    first = decoder_layers(model)[0]
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and any(m is first for m in layers):
            return module
    raise ValueError("no decoder module holding the layers")


def with_levers(model: torch.nn.Module) -> None:
    levers = [lever for lever in os.environ.get("LEVER", "").split(",") if lever]
    print(f"levers: {levers}", flush=True)
    if "float8" in levers:
        from torchao.float8 import convert_to_float8_training
        for layer in decoder_layers(model):
            convert_to_float8_training(layer, module_filter_fn=lambda module, _: (
                isinstance(module, torch.nn.Linear) and module.in_features % 16 == 0
                and module.out_features % 16 == 0))
    if "decoder_compile" in levers:
        decoder_of(model).compile()
    else:
        compile_layers(model)


if __name__ == "__main__":
    finetuning.compile_layers = with_levers
    finetuning.console_main()
