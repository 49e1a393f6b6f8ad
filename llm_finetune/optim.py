"""AdamW (or, for bf16 weights, ``AnyPrecisionAdamW``) and one per-step learning-rate schedule:
linear warm-up, then step / cosine / linear decay or constant. ``step`` reproduces
llama-recipes' StepLR(gamma) applied once per epoch."""

import math

import torch

# elements of a weight that AnyPrecisionAdamW's step updates at once (fp32 temporaries: 64 MiB)
STEP_SLICE = 2**24


class AnyPrecisionAdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights, llama-recipes' ``--fsdp_config.optimizer anyprecision``.

    A bf16 weight has 8 bits of mantissa: an update smaller than half the spacing between its
    neighbouring values rounds away, so with small learning rates AdamW on bf16 weights stops
    moving them. Kahan summation keeps what each weight update lost to rounding in a
    compensation buffer and adds it to the next update, so small updates add up as they do in
    fp32 (tests/test_optim.py). Moments are stored in the weights' dtype, as llama-recipes
    creates them; the arithmetic of a step is fp32. State: 3 values per weight (AdamW: 2)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            for name in ("exp_avg", "exp_avg_sq", "compensation"):
                state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        tensors = (param, param.grad, state["exp_avg"], state["exp_avg_sq"], state["compensation"])
        if not all(t.is_contiguous() for t in tensors):  # no flat view to slice: in one piece
            self._update_slice(*tensors, group, float(state["step"]))
            return
        # A step's fp32 arithmetic makes about six temporaries the size of what it updates: in
        # slices, a large weight (a 128k-token embedding: 1 GiB each in fp32) costs a few
        # slices' worth at the step, not six copies of itself (docs/memory.md). Elementwise:
        # the result is the same bit for bit.
        flat = [t.view(-1) for t in tensors]
        for start in range(0, param.numel(), STEP_SLICE):
            self._update_slice(*(t[start:start + STEP_SLICE] for t in flat), group,
                               float(state["step"]))

    @staticmethod
    def _update_slice(param, grad, exp_avg_state, exp_avg_sq_state, compensation, group: dict,
                      step: float) -> None:
        beta1, beta2 = group["betas"]
        grad = grad.float()
        exp_avg = exp_avg_state.float().lerp(grad, 1 - beta1)
        exp_avg_sq = exp_avg_sq_state.float().mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        exp_avg_state.copy_(exp_avg)
        exp_avg_sq_state.copy_(exp_avg_sq)
        denom = (exp_avg_sq.sqrt_() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        update = exp_avg.div_(denom).mul_(-group["lr"] / (1 - beta1 ** step))
        old = param.float()
        if group["weight_decay"]:
            update.add_(old, alpha=-group["lr"] * group["weight_decay"])
        update.add_(compensation.float())
        param.copy_(old + update)
        compensation.copy_(update - (param.float() - old))  # what rounding dropped

def build_optimizer(model: torch.nn.Module, train_cfg, grad_scaler: bool,
                    kind: str = "AdamW") -> torch.optim.Optimizer:
    """``kind`` (``fsdp_config.optimizer``): AdamW over the trainable parameters, fused on GPUs,
    except under fp16 loss scaling: the fused kernel breaks on the (sharded) gradient scaler's
    inf check (pytorch/pytorch#140514; our fp16 FSDP GPU test failed with it) and is reported
    to train worse with fp16 AMP. ``anyprecision``: ``AnyPrecisionAdamW``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: every weight is frozen")
    if kind == "anyprecision":
        return AnyPrecisionAdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
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
