"""llm_finetune: torchrun-native fine-tuning of Hugging Face causal LMs with raw PyTorch FSDP."""

__version__ = "0.1.0"

import logging


class _QuietTorchaoImport(logging.Filter):
    """torchao (--float8), where installed, is imported by transformers too, on every run: it
    warns about the kernels it ships for other GPUs and PyTorch builds (mxfp8, CUTLASS), none
    of them used here, and PyTorch about how torchao registers its enums. Only those go."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Failed to load") and "torchao" in message
                    or "is an Enum subclass and is now natively supported" in message)


logging.getLogger("torchao").addFilter(_QuietTorchaoImport())
logging.getLogger("torch.utils._pytree").addFilter(_QuietTorchaoImport())
