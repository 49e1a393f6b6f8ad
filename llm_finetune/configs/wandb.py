"""Weights & Biases settings (llama-recipes' ``wandb_config`` names), used with ``--use_wandb``."""

from dataclasses import dataclass


@dataclass
class wandb_config:
    project: str = "llama_cookbook"  # llama-recipes' project: migrated runs log beside theirs
    entity: str = ""  # your user or team; "": wandb's default
    job_type: str = ""
    tags: list[str] = None
    group: str = ""
    notes: str = ""
    mode: str = ""  # online | offline | disabled; "": wandb's default (WANDB_MODE)
