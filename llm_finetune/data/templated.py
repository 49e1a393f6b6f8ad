"""Prompt-template data sets of llama-recipes (samsum, grammar): each row's columns fill a
prompt template, and one column is the response, the only part with a loss. Rows come from the
Hugging Face hub (``hub_name``: a hub name, or a local directory of the data set's files) or,
always offline, from local files (``train_file`` / ``eval_file``: JSON, JSONL, CSV or Parquet;
or, as llama-recipes' grammar_dataset takes them, a file path as the split)."""

import string
from pathlib import Path

import datasets

from llm_finetune.data.files import read_files
from llm_finetune.data.read import BUILDERS, require_columns
from llm_finetune.data.rows import DataError, prompt_response_sample, require_text, tokenize_rows


def read_split(config, split: str):
    """(rows, RowSource or None) of the split: from local files when given, else the hub."""
    train = split == config.train_split
    local = config.train_file if train else config.eval_file
    name = type(config).__name__
    if local:
        return read_files(local, f"--{name}.{'train_file' if train else 'eval_file'}")
    if Path(split).suffix in BUILDERS:  # llama-recipes: --grammar_dataset.train_split FILE.csv
        return read_files(split, f"--{name}.{'train_split' if train else 'test_split'}")
    try:
        return datasets.load_dataset(config.hub_name, getattr(config, "hub_config", None) or None,
                                     split=split), None
    except Exception as error:  # offline, unknown repo, gated data set
        reason = " ".join(str(error).split())[:200]  # one line
        raise DataError(f"{name}: could not load {config.hub_name!r} split {split!r} from the "
                        f"hub ({type(error).__name__}: {reason}). Download it and pass "
                        f"--{name}.train_file and --{name}.eval_file") from error


def load_templated(config, tokenizer, split: str, max_length: int, bad_rows: str,
                   num_proc: int = 1):
    rows, source = read_split(config, split)
    return tokenize_templated(config, rows, source, tokenizer, split, max_length, bad_rows,
                              num_proc)


def tokenize_templated(config, rows, source, tokenizer, split: str, max_length: int,
                       bad_rows: str, num_proc: int = 1):
    """Samples of ``rows``: the prompt template filled from each row, then its response."""
    fields = [f for _, f, _, _ in string.Formatter().parse(config.prompt) if f]
    name = type(config).__name__
    require_columns(rows, {**{f: f"--{name}.prompt" for f in fields},
                           config.response_column: f"--{name}.response_column"},
                    f"{name} {split}")

    def to_sample(row):
        prompt = config.prompt.format(**{f: require_text(row, f) for f in fields})
        response = require_text(row, config.response_column)
        return prompt_response_sample(tokenizer, prompt, response, max_length)

    return tokenize_rows(rows, to_sample, f"{name} {split}", bad_rows, num_proc,
                         where=source.where if source else None)
