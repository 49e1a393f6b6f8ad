"""llm_finetune: torchrun-native fine-tuning of Hugging Face causal LMs with raw PyTorch FSDP."""

__version__ = "0.1.0"
