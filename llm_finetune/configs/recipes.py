"""Recipes of the built-in models: what a built-in model trains with for the settings the user
did not give (``config_utils.apply_recipe``).

The defaults in ``training.py`` are llama-recipes', sized for real models (4096-token packed
blocks, lr 1e-4, samsum from the hub). The built-in tiny model (1M parameters, a 1024-token
vocabulary) needs the shipped data, a larger step and short padded batches to learn something in
a minute on CPU: it carries those, the way a preset would, instead of the library's defaults
bending to it. Keys are what a user types: ``lr`` (train_config), ``alpaca_dataset.data_path``.
"""

from llm_finetune.configs.datasets import SHIPPED_ALPACA

# what a 1M-parameter model needs to learn in a minute on CPU: short padded batches, a large step
SMALL_MODEL = {
    "batching_strategy": "padding",
    "context_length": 512,
    "batch_size_training": 8,
    "val_batch_size": 8,
    "num_epochs": 2,
    "lr": 1e-3,
}

RECIPES = {
    "tiny-llama": {"dataset": "alpaca_dataset", "alpaca_dataset.data_path": SHIPPED_ALPACA,
                   **SMALL_MODEL},
    # no shipped data: rows with images are the user's (--dataset file_dataset; docs/vision.md)
    "tiny-mllama": dict(SMALL_MODEL),
}
