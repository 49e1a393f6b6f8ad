"""A lever measured, not shipped: ``python -m llm_finetune.finetuning`` with liger-kernel's
RMSNorm, SwiGLU and RoPE kernels patched into transformers' Llama before the model is built
(our chunked loss stays: liger's fused linear cross-entropy replaces a loss we do not compute).
benchmarks/peers.py compares it with our compiled layers (docs/performance.md).

    python benchmarks/with_liger.py --model_name llama3-8b --use_peft ...   (finetuning's flags)
"""

from liger_kernel.transformers import apply_liger_kernel_to_llama

from llm_finetune import finetuning

if __name__ == "__main__":
    apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False)
    finetuning.console_main()
