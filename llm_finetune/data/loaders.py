"""Build the train and eval data loaders for the configured data set and batching strategy."""

import os
from pathlib import Path

import pyarrow
import torch
from torch.utils.data import DataLoader

from llm_finetune.data.alpaca import load_alpaca
from llm_finetune.data.batching import GlobalBatchSampler, pack_samples, pad_collate, packed_collate
from llm_finetune.data.custom import custom_collator, defines_collator, load_custom
from llm_finetune.data.files import load_files
from llm_finetune.data.images import IMAGES_COLUMN, image_collate, most_images
from llm_finetune.data.grammar import load_grammar
from llm_finetune.data.guard_rows import check_guard_settings, load_llama_guard
from llm_finetune.data.read import BUILDERS
from llm_finetune.data.pairs import (IMAGE_PAIR_COLUMNS, PAIR_COLUMNS, load_pairs,
                                     pair_collate, pair_lengths, pair_tokens)
from llm_finetune.data.rows import DataError, check_labels
from llm_finetune.data.templated import load_templated
from llm_finetune.data.toxicchat import load_toxicchat
from llm_finetune.distributed import DistInfo, barrier
from llm_finetune.errors import ConfigError


def load_dataset_split(run, tokenizer, split: str, collated: bool = False, processor=None):
    """The tokenised samples (input_ids, labels) of one split of the configured data set, with
    at least one sample that has tokens to learn; for ``--method dpo``, preference pairs (each
    with tokens to learn on both sides). ``collated``: a custom data set's collator makes the
    batches, and its rows are whatever it reads (labels, if any, are checked)."""
    t = run.train
    if t.method == "dpo":
        return load_pairs(run.dataset, tokenizer, split, t.context_length, t.bad_rows, t.seed,
                          t.tokenize_num_proc, processor)
    samples = read_dataset_split(run, tokenizer, split, collated, processor)
    if "labels" in samples.column_names:
        check_labels(samples, f"{t.dataset} {split}", t.context_length)
    return samples


def read_dataset_split(run, tokenizer, split: str, collated: bool = False, processor=None):
    t = run.train
    if t.dataset == "file_dataset":
        return load_files(run.dataset, tokenizer, split, t.context_length, t.bad_rows, t.seed,
                          t.tokenize_num_proc, processor)
    if t.dataset == "custom_dataset":  # a vision model's processor, as llama-recipes passes
        return load_custom(run.dataset, processor or tokenizer, split, t.context_length,
                           collated)
    if t.dataset == "grammar_dataset":
        return load_grammar(run.dataset, tokenizer, split, t.context_length, t.bad_rows,
                            t.tokenize_num_proc)
    if t.dataset == "samsum_dataset":
        return load_templated(run.dataset, tokenizer, split, t.context_length, t.bad_rows,
                              t.tokenize_num_proc)
    if t.dataset == "llamaguard_toxicchat_dataset":
        return load_toxicchat(run.dataset, tokenizer, split, t.context_length, t.bad_rows,
                              t.seed, t.tokenize_num_proc)
    if t.dataset == "llama_guard_dataset":
        return load_llama_guard(run.dataset, tokenizer, split, t.context_length, t.bad_rows,
                                t.seed, t.tokenize_num_proc)
    return load_alpaca(run.dataset, tokenizer, split, t.context_length, t.bad_rows,
                       t.tokenize_num_proc)


def load_split(run, tokenizer, split: str, dist_info: DistInfo, collated: bool = False,
               processor=None):
    """Tokenise one split, rank 0 first so that the other ranks read its ``datasets`` cache."""
    if not dist_info.is_main:
        barrier()
    data = load_dataset_split(run, tokenizer, split, collated, processor)
    if dist_info.is_main:
        barrier()
    return data


def data_collator(run, tokenizer):
    """A custom data set's own collator (llama-recipes' ``get_data_collator``), or None.
    ``tokenizer``: what the collator is given, a vision model's processor."""
    if run.train.dataset != "custom_dataset" or not defines_collator(run.dataset):
        return None
    if run.train.batching_strategy == "packing":
        raise DataError(f"--custom_dataset.file {run.dataset.file} defines get_data_collator, "
                        "which makes batches of whole rows that packing cannot join: use "
                        "--batching_strategy padding")
    return custom_collator(run.dataset, tokenizer)


def build_dataloaders(run, tokenizer, dist_info: DistInfo, processor=None):
    """(train loader, eval loader or None). ``processor``: a vision model's, which makes the
    batches of rows with images."""
    t = run.train
    collator = data_collator(run, processor or tokenizer)
    splits = [run.dataset.train_split] + ([run.dataset.test_split] if t.run_validation else [])
    train, *evals = [load_split(run, tokenizer, split, dist_info, collator is not None,
                                processor) for split in splits]
    return (make_loader(train, t.batch_size_training, run, tokenizer, dist_info, shuffle=True,
                        accumulation=t.gradient_accumulation_steps, collator=collator,
                        processor=processor),
            make_loader(evals[0], t.val_batch_size, run, tokenizer, dist_info, shuffle=False,
                        collator=collator, processor=processor) if evals else None)


def make_loader(data, batch_size: int, run, tokenizer, dist_info: DistInfo, shuffle: bool,
                accumulation: int = 1, collator=None, processor=None):
    """``collator``: a custom data set's own, given whole rows; rows with images are batched by
    ``processor`` (padding only: vision.check_vision_settings); else the rows' input_ids and
    labels are padded or packed here."""
    t = run.train
    pairs = t.method == "dpo"  # padding only (preference.check_preference_settings)
    if collator is not None:
        samples, collate = data, collator
    elif pairs:
        with_images = IMAGES_COLUMN in data.column_names
        samples = token_columns(data, IMAGE_PAIR_COLUMNS if with_images else PAIR_COLUMNS)
        collate = pair_collate(tokenizer.pad_token_id, processor if with_images else None)
    elif IMAGES_COLUMN in data.column_names:
        if t.batching_strategy == "packing":
            raise DataError("rows with images are batched whole, with their images: use "
                            "--batching_strategy padding")
        samples = token_columns(data, ("input_ids", "labels", "text", IMAGES_COLUMN))
        collate = image_collate(processor)
    elif t.batching_strategy == "packing":
        samples = pack_samples(token_columns(data), t.context_length, tokenizer.pad_token_id)
        collate = packed_collate
    else:
        samples, collate = token_columns(data), pad_collate(tokenizer.pad_token_id)
    lengths = pair_lengths(samples) if pairs else sample_lengths(samples)
    if not shuffle:  # evaluation: a small eval split still gets evaluated, in smaller batches
        batch_size = max(1, min(batch_size, len(lengths) // dist_info.world_size))
    sampler = GlobalBatchSampler(lengths, batch_size, dist_info.rank, dist_info.world_size,
                                 shuffle=shuffle, seed=t.seed,
                                 group_by_length=t.batching_strategy == "padding",
                                 accumulation=accumulation)
    if dist_info.is_main and shuffle and collator is None:
        padding = padding_fraction(samples, sampler, t, pair_tokens(samples) if pairs else None)
        print(f"{t.batching_strategy}: {padding:.1%} of the tokens in training batches are "
              "padding", flush=True)
    if len(sampler) == 0:
        raise ValueError(f"{len(lengths)} samples cannot fill one optimizer step of "
                         f"{batch_size} x {dist_info.world_size} ranks x {accumulation} "
                         "accumulation steps: lower the batch size")
    # its own generator: creating an iterator draws a seed, which must not come from the global
    # RNG that dropout uses (a resumed run would otherwise draw different dropout masks)
    generator = torch.Generator().manual_seed(t.seed)
    return DataLoader(samples, batch_sampler=sampler, collate_fn=collate, generator=generator,
                      num_workers=t.num_workers_dataloader, pin_memory=dist_info.device.type == "cuda",
                      persistent_workers=False)


def images_per_row(loader) -> int:
    """The most images a training row holds (0 without images): what the memory plan must
    count (``--images_per_sample``), read from the Arrow column without opening an image. A
    custom data set whose ``images`` are not lists is not counted (its own layout)."""
    data = loader.dataset
    if (IMAGES_COLUMN not in getattr(data, "column_names", ())
            or not pyarrow.types.is_list(data.data.column(IMAGES_COLUMN).type)):
        return 0
    return most_images(data)


def sample_lengths(samples) -> list[int]:
    """Tokens per sample, what the sampler groups batches by; rows that a custom collator
    tokenises itself (no input_ids) count as equally long."""
    if isinstance(samples, list):  # packed blocks
        return [len(s["input_ids"]) for s in samples]
    if "input_ids" not in samples.column_names:
        return [1] * len(samples)
    return [len(ids) for ids in samples["input_ids"]]


def token_columns(data, columns=("input_ids", "labels")):
    return data.remove_columns([c for c in data.column_names if c not in columns])


def padding_fraction(samples, sampler: GlobalBatchSampler, train_cfg, pairs=None) -> float:
    """Share of padding in this rank's batches of the first epoch (what the GPU wastes).
    ``pairs``: per DPO pair, the tokens of both its sides, each padded to the batch's longest."""
    real = padded = 0
    for batch in sampler:
        if train_cfg.batching_strategy == "packing":
            real += sum(samples[i]["num_tokens"] for i in batch)
            padded += train_cfg.context_length * len(batch)
        else:
            lengths = [sampler.lengths[i] for i in batch]
            real += sum(lengths) if pairs is None else sum(pairs[i] for i in batch)
            padded += max(lengths) * len(lengths) * (1 if pairs is None else 2)
    return 1 - real / padded if padded else 0.0


ALPACA_SOURCE = ("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/"
                 "alpaca_data.json")


def check_data_settings(run) -> None:
    """The data set has what it needs named, and every local file it will read exists."""
    t = run.train
    if t.dataset == "file_dataset" and not run.dataset.data_files:
        raise ConfigError("--dataset file_dataset needs --file_dataset.data_files PATH[,PATH...]")
    if t.dataset == "custom_dataset" and not run.dataset.file:
        raise ConfigError("--dataset custom_dataset needs --custom_dataset.file "
                          "path/to/file.py[:function]")
    check_data_files(run)
    check_guard_settings(run)


def check_data_files(run) -> None:
    """Every local data file the run will read exists, before the model loads (a custom data
    set's ``data_path`` is its function's to read: it may name anything)."""
    t = run.train
    data_path = getattr(run.dataset, "data_path", "")
    if data_path and t.dataset != "custom_dataset" and not os.path.exists(data_path):
        where = ""
        if Path(data_path).name == "alpaca_data.json":
            where = (f". It is the Stanford Alpaca data set that llama-recipes trains on: "
                     f"download it from {ALPACA_SOURCE} and point --{t.dataset}.data_path at "
                     "the file (relative paths start from the current directory)")
        raise ConfigError(f"--{t.dataset}.data_path {data_path}: no such file{where}")
    for setting in ("data_files", "eval_files", "train_file", "eval_file"):
        for file in str(getattr(run.dataset, setting, "")).split(","):
            if file.strip() and not Path(file.strip()).is_file():
                raise ConfigError(f"--{t.dataset}.{setting}: {file.strip()}: no such file")
    if t.dataset in ("samsum_dataset", "grammar_dataset", "llamaguard_toxicchat_dataset"):
        for setting in ("train_split", "test_split"):  # llama-recipes names files there
            split = getattr(run.dataset, setting)
            if Path(split).suffix in BUILDERS and not Path(split).is_file():
                raise ConfigError(f"--{t.dataset}.{setting}: {split}: no such file")
