"""A lever measured, not shipped: ``python -m llm_finetune.finetuning`` with packed batches on
flex attention instead of the varlen flash-attention kernel (what a PyTorch without
``torch.nn.attention.varlen`` gets), to compare the two on the same GPU (docs/performance.md).

    python benchmarks/with_flex.py --model_name llama3.2-1b ...   (finetuning's flags)
"""

from llm_finetune import finetuning, model

if __name__ == "__main__":
    model.varlen_available = lambda: False
    finetuning.console_main()
