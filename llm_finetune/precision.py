"""Which dtype weights are stored in and which dtype the forward/backward computes in."""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    weight_dtype: torch.dtype  # dtype the model is loaded in
    compute_dtype: torch.dtype  # autocast (one process) or FSDP mixed-precision dtype
    grad_scaler: bool  # fp16 needs loss scaling

    @property
    def autocast(self) -> bool:
        return self.compute_dtype != self.weight_dtype


def choose_precision(run, cuda: bool, bf16_supported: bool | None = None) -> Precision:
    """bf16 weights with ``pure_bf16`` (or for a frozen PEFT base on one GPU); fp32 master
    weights with bf16/fp16 compute under mixed precision; plain fp32 on CPU, where bf16
    autocast is slow and only approximates single-process results.

    ``bf16_supported``: whether the GPU computes in bf16 (default: ask the GPU present; the
    memory planner passes True to plan for a GPU it does not have)."""
    t, f = run.train, run.fsdp
    if f.pure_bf16 or t.quantization == "4bit" and t.enable_fsdp:
        return Precision(torch.bfloat16, torch.bfloat16, False)
    if not cuda:
        return Precision(torch.float32, torch.float32, False)
    if t.use_fp16 or f.use_fp16:
        return Precision(torch.float32, torch.float16, True)
    mixed = f.mixed_precision if t.enable_fsdp else t.mixed_precision
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if not mixed or not bf16_supported:
        return Precision(torch.float32, torch.float32, False)
    # one process with a frozen base: bf16 base weights, peft keeps the adapters in fp32
    weights = torch.bfloat16 if t.use_peft and not t.enable_fsdp else torch.float32
    return Precision(weights, torch.bfloat16, False)
