"""The run's output directory, checked before anything loads: writable, and not holding a
previous run that this one would silently mix with or replace.

A run writes ``run_config.json`` and ``metrics.jsonl`` at its start and its model as it goes (a
PEFT adapter directly in the directory, as llama-recipes saves it; full weights in ``model/``),
so a second run into the same directory would replace the first one's record, and one killed
early would leave the old model beside the new config. Reusing a directory is therefore
something to ask for: ``--resume_from_checkpoint`` (continue that run) or
``--overwrite_output_dir True`` (remove what the previous run wrote, then start afresh).
Once the model is built, ``check_output_dir`` checks that the directory has room for what the
run will save.
"""

import os
import shutil
from pathlib import Path

from llm_finetune.checkpoint_files import step_dirs
from llm_finetune.errors import ConfigError
from llm_finetune.distributed import DistInfo

# what a run writes directly under output_dir (export.py, training_checkpoint.py, metrics.py,
# plot.py, trackers.py)
RUN_OUTPUTS = ("run_config.json", "metrics.jsonl", "model", "checkpoints", "plots", "tensorboard",
               "profiler", "memory_snapshot", "wandb", "wandb_run_id", "model.tmp", "adapter.tmp")
# what a PEFT run's saved model puts directly in output_dir (export.py): the adapter, the
# settings, the seed of a base without weights, the optimizer, and the tokenizer (the files
# transformers writes for Llama, Qwen2 and Mistral tokenizers)
SAVED_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "train_params.yaml",
                       "random_init_base.json", "optimizer.pt", "tokenizer.json",
                       "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                       "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt")
# any one of these means a run got past its start
RUN_MARKERS = ("run_config.json", "metrics.jsonl", "model", "checkpoints", "adapter_config.json")


def previous_run_outputs(train_cfg) -> list[str]:
    """Names of a previous run's outputs in ``output_dir`` (empty: a fresh directory), the
    sharded model directory (``<dist_checkpoint_folder>-<model>``) included."""
    directory = Path(train_cfg.output_dir)
    if not any((directory / name).exists() for name in RUN_MARKERS):
        return []
    sharded = sorted(p.name for p in directory.glob(f"{train_cfg.dist_checkpoint_folder}-*"))
    return [name for name in RUN_OUTPUTS + SAVED_ADAPTER_FILES
            if (directory / name).exists()] + sharded


def check_writable(output_dir: str) -> None:
    """The directory exists and is writable, or can be created: without creating anything."""
    path = Path(output_dir).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--output_dir {output_dir} is not writable ({existing} is a file, "
                          "not a directory): choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {output_dir} is not writable (no write permission on "
                          f"{existing}): choose another directory")


def check_output_dir_reuse(train_cfg) -> None:
    """Refuse a directory holding a previous run unless the user resumes or overwrites it."""
    check_writable(train_cfg.output_dir)
    if train_cfg.resume_from_checkpoint or train_cfg.overwrite_output_dir:
        return
    found = previous_run_outputs(train_cfg)
    if found:
        raise ConfigError(f"--output_dir {train_cfg.output_dir} holds a previous run "
                          f"({', '.join(found)}): continue it with --resume_from_checkpoint auto, "
                          "replace it with --overwrite_output_dir True, or choose another "
                          "--output_dir")


def clear_previous_run(train_cfg) -> None:
    """With ``--overwrite_output_dir`` (and no resume): remove the previous run's outputs, so
    that nothing of it is left beside the new run's, whenever that one stops."""
    if not train_cfg.overwrite_output_dir or train_cfg.resume_from_checkpoint:
        return
    found = previous_run_outputs(train_cfg)
    for name in found:
        path = Path(train_cfg.output_dir) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if found:
        print(f"--overwrite_output_dir: removed the previous run's {', '.join(found)} from "
              f"{train_cfg.output_dir}", flush=True)


def expected_save_bytes(model, run, world_size: int) -> int:
    """What the run's saves will write at most: the trainable (PEFT) or all weights, plus AdamW
    moments in fp32 when optimizer states are saved. Under FSDP each rank sees its shard."""
    params = [p for p in model.parameters() if p.requires_grad or not run.train.use_peft]
    total = sum(p.numel() * p.element_size() for p in params)
    moments = sum(p.numel() * 8 for p in model.parameters() if p.requires_grad)
    if run.train.save_optimizer or run.train.save_steps or run.train.save_each_epoch:
        total += moments
    return total * (world_size if run.train.enable_fsdp else 1)


def copies_on_disk_at_once(run) -> int:
    """How many saves' worth of new bytes the output directory must hold at the busiest moment:
    the checkpoints kept (``--save_total_limit``) plus the one being written, less the ones a
    resumed run finds already there (they are pruned, not added to). Keeping all checkpoints
    (limit 0) asks for room for two: the run cannot know how many it will write."""
    limit = run.train.save_total_limit
    if not limit:
        return 2
    already_there = len(step_dirs(run.train.output_dir))
    return max(1, limit + 1 - already_there)


def check_output_dir(model, run, dist_info: DistInfo) -> None:
    """Fail before training, not at the first save hours later: output_dir must be writable and
    have room for the saves it will hold at once (the new one is written before an old one is
    removed)."""
    if not dist_info.is_main:
        return
    directory = Path(run.train.output_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--output_dir {directory} is not writable ({error.strerror}): "
                          "choose another directory") from error
    if not (run.train.save_model or run.train.save_steps or run.train.save_each_epoch):
        return
    needed = copies_on_disk_at_once(run) * expected_save_bytes(model, run, dist_info.world_size)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise ConfigError(f"--output_dir {directory} has {free / 2**30:.1f} GiB free, the run's "
                          f"checkpoints need about {needed / 2**30:.1f} GiB: free space, choose "
                          "another directory, or lower --save_total_limit")
