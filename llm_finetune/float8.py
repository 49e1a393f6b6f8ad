"""``--float8``: the language model's decoder layers compute their linear layers' matmuls in
float8, with torchao's float8 training (a scale per tensor, computed from its largest value at
each step; e4m3 for weights and inputs, e5m2 for gradients). The weights, their gradients and
the optimizer stay in their own precision, and the saved model is the same plain checkpoint.

For full fine-tuning on GPUs with float8 tensor cores (compute capability 8.9: H100, H200,
L40S), with ``--torch_compile True`` (eager float8 spends on casting what the matmuls save).
Frozen weights gain nothing: each micro-batch would cast them again for matmuls that train
nothing, so a frozen base (LoRA, QLoRA, ``--freeze_LLM_only``) is refused and frozen layers
(``--freeze_layers``) keep plain linears. DPO's frozen reference is a copy of the model as it
starts, float8 layers included. Measurements and the loss against bf16: docs/performance.md.
"""

import importlib.util

import torch

from llm_finetune.errors import ConfigError

FLOAT8_CAPABILITY = (8, 9)


def torchao_installed() -> bool:
    return importlib.util.find_spec("torchao") is not None


def check_float8_settings(run, cuda: bool, capability: tuple[int, int] | None = None) -> None:
    t = run.train
    if not t.float8:
        return
    frozen_base = ("--use_peft" if t.use_peft else f"--quantization {t.quantization}"
                   if t.quantization else "--freeze_LLM_only" if t.freeze_LLM_only else "")
    if frozen_base:
        raise ConfigError(
            f"--float8 speeds up the matmuls of weights that train; with a frozen base "
            f"({frozen_base}) every micro-batch casts the frozen weights again and the run is "
            "slower, not faster (docs/performance.md): drop --float8, or fine-tune all weights")
    fp16 = "--use_fp16" if t.use_fp16 else "--fsdp_config.use_fp16" if run.fsdp.use_fp16 else ""
    if fp16:
        raise ConfigError(f"--float8 does not support fp16 loss scaling: drop {fp16} (bf16 "
                          "mixed precision, the default, or --fsdp_config.pure_bf16 True)")
    if not torchao_installed():
        raise ConfigError("--float8 needs torchao: pip install 'llm_finetune[float8]' "
                          "(or pip install torchao)")
    if cuda:
        # the planner checks a GPU run from a machine that may have none: then only the rest
        if capability is None and torch.cuda.is_available():
            capability = torch.cuda.get_device_capability()
        if capability is not None and tuple(capability) < FLOAT8_CAPABILITY:
            raise ConfigError(
                f"--float8 needs float8 tensor cores (compute capability 8.9 or newer: H100, "
                f"H200, L40S); this GPU's is {capability[0]}.{capability[1]}: drop --float8")
        if not t.torch_compile:
            raise ConfigError("--float8 without compiled layers casts every tensor in eager "
                              "kernels and loses what float8 matmuls gain: add "
                              "--torch_compile True")


def convert_to_float8(layers: list[torch.nn.Module]) -> int:
    """Swap the linear layers inside ``layers`` for torchao's ``Float8Linear`` (a subclass
    with the same parameters, so state dicts and FSDP see nothing new); returns how many.
    float8 matmuls need both sizes divisible by 16: other linears stay as they are, and so do
    frozen ones."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    def eligible(module: torch.nn.Module, _name: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and module.weight.requires_grad
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    for layer in layers:
        convert_to_float8_training(layer, module_filter_fn=eligible)
    return sum(isinstance(m, Float8Linear) for layer in layers for m in layer.modules())
