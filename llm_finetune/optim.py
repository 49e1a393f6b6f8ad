"""AdamW and one per-step learning-rate schedule: linear warm-up, then step / cosine / linear
decay or constant. ``step`` reproduces llama-recipes' StepLR(gamma) applied once per epoch."""

import math

import torch


def build_optimizer(model: torch.nn.Module, train_cfg, grad_scaler: bool) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, fused on GPUs, except under fp16 loss scaling: the
    fused kernel breaks on the (sharded) gradient scaler's inf check (pytorch/pytorch#140514;
    our fp16 FSDP GPU test failed with it) and is reported to train worse with fp16 AMP."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: every weight is frozen")
    fused = not grad_scaler and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                             fused=fused or None)


def lr_factor(step: int, train_cfg, steps_per_epoch: int, total_steps: int) -> float:
    """Multiplier of the base learning rate before optimizer step ``step`` (0-based)."""
    warmup = train_cfg.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    kind = train_cfg.lr_scheduler
    if kind == "step":
        return train_cfg.gamma ** (step // max(steps_per_epoch, 1))
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(total_steps - warmup, 1)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return max(1.0 - progress, 0.0)  # linear


def build_scheduler(optimizer, train_cfg, steps_per_epoch: int, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train_cfg, steps_per_epoch, total_steps))
