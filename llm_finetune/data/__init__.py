"""Data sets, batching and samplers. ``build_dataloaders`` is the one entry the run calls."""

from llm_finetune.data.loaders import build_dataloaders

__all__ = ["build_dataloaders"]
