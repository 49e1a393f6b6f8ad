"""Shared by the tests and by the torchrun worker they launch."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from llm_finetune.configs.recipes import RECIPES
from llm_finetune.model import BUILTIN_MODELS

REPO = Path(__file__).resolve().parent.parent

# tiny-llama's recipe as flags (shipped data, padding, 512 tokens, lr 1e-3, ...): a model saved
# to a directory (tiny_model_dir) has no recipe, and the defaults are llama-recipes' (samsum
# from the hub, 4096-token packed blocks); with these it trains as the built-in model does
TINY_RECIPE = dict(RECIPES["tiny-llama"])

def recipe_flags(*leave_out: str) -> list[str]:
    """TINY_RECIPE as command-line flags, less the settings named in ``leave_out``."""
    return [flag for key, value in TINY_RECIPE.items() if key not in leave_out
            for flag in (f"--{key}", str(value))]

# Small, fast settings on the tiny model: a few fp32 steps, no dropout in LoRA so that runs are
# deterministic and sharded runs can be compared with single-process ones step for step.
FAST = dict(TINY_RECIPE, max_train_step=4, max_eval_step=2, batch_size_training=4,
            val_batch_size=4, num_epochs=1, num_workers_dataloader=0, lr=1e-3, save_model=False,
            plot_metrics=False, **{"lora_config.lora_dropout": 0.0})

# DPO on the shipped preference pairs (tools/make_tiny_preferences.py)
TINY_PREFERENCES = REPO / "llm_finetune" / "assets" / "data" / "tiny_preferences.jsonl"
DPO = {"method": "dpo", "dataset": "file_dataset",
       "file_dataset.data_files": str(TINY_PREFERENCES)}


def save_tiny_model(directory: Path, seed: int = 0, tie_embeddings: bool = False) -> Path:
    """A weights-on-disk copy of the built-in tiny model (what a user's checkpoint looks like)."""
    config = AutoConfig.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    config.tie_word_embeddings = tie_embeddings
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"]).save_pretrained(directory)
    return directory


def probe_input(vocab_size: int = 1024) -> torch.Tensor:
    return torch.randint(3, vocab_size, (2, 24), generator=torch.Generator().manual_seed(7))


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 300) -> None:
    """Run ``script`` under torchrun on CPU (gloo); raise with its output if it fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), str(script), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                             f"{done.stdout[-6000:]}\n{done.stderr[-12000:]}")


def parse_flags(args: list[str]) -> tuple[list[str], dict]:
    """fire's reading of ``--key value`` / ``--key=value`` / bare ``--flag`` (True)."""
    positional, flags, i = [], {}, 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value, i = args[i + 1], i + 1
                else:
                    value = "True"
            flags[key] = value
        elif arg != "...":
            positional.append(arg)
        i += 1
    return positional, flags
