"""Configuration dataclasses. Each run is a ``train_config`` plus one instance of every other
class here; ``llm_finetune.config_utils`` fills them from keyword arguments and files."""

from llm_finetune.configs.datasets import (alpaca_dataset, custom_dataset, file_dataset,
                                            grammar_dataset, llama_guard_dataset,
                                            llamaguard_toxicchat_dataset, samsum_dataset)
from llm_finetune.configs.fsdp import fsdp_config
from llm_finetune.configs.peft import lora_config, llama_adapter_config, prefix_config
from llm_finetune.configs.quantization import quantization_config
from llm_finetune.configs.training import train_config
from llm_finetune.configs.wandb import wandb_config

DATASET_CONFIGS = {cls.__name__: cls for cls in (alpaca_dataset, file_dataset, custom_dataset,
                                                 samsum_dataset, grammar_dataset,
                                                 llamaguard_toxicchat_dataset,
                                                 llama_guard_dataset)}

__all__ = [
    "train_config", "fsdp_config", "lora_config", "llama_adapter_config", "prefix_config",
    "quantization_config", "wandb_config", "alpaca_dataset", "file_dataset", "custom_dataset", "samsum_dataset",
    "grammar_dataset", "llamaguard_toxicchat_dataset", "llama_guard_dataset", "DATASET_CONFIGS",
]
