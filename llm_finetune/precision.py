"""Which dtype frozen weights, trainable weights and the forward/backward use."""

from dataclasses import dataclass

import torch

from llm_finetune.errors import ConfigError


@dataclass(frozen=True)
class Precision:
    weight_dtype: torch.dtype  # dtype the model is loaded in (its frozen weights, with adapters)
    trainable_dtype: torch.dtype  # what the optimizer updates: full weights or adapters
    compute_dtype: torch.dtype  # autocast (one process) or FSDP mixed-precision dtype
    grad_scaler: bool  # fp16 needs loss scaling

    @property
    def autocast(self) -> bool:
        """Whether a run without FSDP (whose mixed precision casts instead) needs autocast:
        some weights are stored in another dtype than the compute dtype (fp32 masters, or fp32
        adapters over a bf16 base: llama_adapter feeds its fp32 prompt to the bf16 base)."""
        return self.compute_dtype != self.weight_dtype or \
            self.compute_dtype != self.trainable_dtype


def choose_precision(run, cuda: bool, bf16_supported: bool | None = None) -> Precision:
    """bf16 everywhere with ``pure_bf16``; otherwise trainable weights keep fp32 masters and the
    forward/backward computes in bf16 (fp16 with a loss scaler); plain fp32 on CPU, where bf16
    autocast is slow and only approximates single-process results.

    A frozen base (``use_peft``) is stored in the compute dtype whatever the settings: nothing
    updates it, so fp32 copies would only double its memory. Only the adapters, which the
    optimizer updates, keep fp32 masters.

    ``bf16_supported``: whether the GPU computes in bf16 (default: ask the GPU present; the
    memory planner passes True to plan for a GPU it does not have)."""
    t, f = run.train, run.fsdp
    if f.pure_bf16 or t.quantization == "4bit" and t.enable_fsdp:
        return Precision(torch.bfloat16, torch.bfloat16, torch.bfloat16, False)
    if not cuda:
        return Precision(torch.float32, torch.float32, torch.float32, False)
    mixed = f.mixed_precision if t.enable_fsdp else t.mixed_precision
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if t.use_fp16 or f.use_fp16:
        compute = torch.float16
    elif mixed and bf16_supported:
        compute = torch.bfloat16
    else:
        return Precision(torch.float32, torch.float32, torch.float32, False)
    weights = compute if t.use_peft else torch.float32
    return Precision(weights, torch.float32, compute, grad_scaler=compute == torch.float16)


def make_grad_scaler(precision: Precision, fsdp: bool, device: torch.device):
    """The loss scaler fp16 needs (FSDP's sharded one under FSDP); None otherwise."""
    if not precision.grad_scaler:
        return None
    if fsdp:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type)
    return torch.amp.GradScaler(device.type)


def check_precision_settings(run, cuda: bool) -> None:
    """Precisions that contradict each other or need a GPU, and the optimizer that only bf16
    weights need."""
    t, f = run.train, run.fsdp
    if (t.use_fp16 or f.use_fp16) and f.pure_bf16:
        raise ConfigError("--use_fp16 and --fsdp_config.pure_bf16 ask for two precisions: "
                          "pick one (bf16 is the safer choice on GPUs that support it)")
    if (t.use_fp16 or f.use_fp16) and not cuda:
        raise ConfigError("--use_fp16 needs a CUDA GPU; on CPU drop it (training runs in fp32)")
    if f.optimizer == "anyprecision" and \
            choose_precision(run, cuda).trainable_dtype != torch.bfloat16:
        raise ConfigError("--fsdp_config.optimizer anyprecision makes up for what updates to "
                          "bf16 weights lose to rounding, and these weights are fp32, where "
                          "AdamW loses nothing (llama-recipes then silently uses AdamW): add "
                          "--fsdp_config.pure_bf16 True, or drop the optimizer setting")
