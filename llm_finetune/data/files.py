"""``file_dataset``: the user's own files (JSONL, JSON, Parquet, CSV) in one of two shapes.

- instruction rows: ``{"instruction", "input", "output"}`` (column names configurable), in the
  Alpaca prompt format, loss on the output;
- chat rows: ``{"messages": [{"role", "content"}, ...]}``, rendered with the tokenizer's chat
  template, loss on the assistant turns only.

The eval split is ``eval_files`` if given, else a seeded ``val_split`` fraction of the rows.
"""

from pathlib import Path

import datasets

from llm_finetune.data.alpaca import instruction_sample
from llm_finetune.data.rows import DataError, chat_sample, tokenize_rows

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def read_files(spec: str) -> datasets.Dataset:
    files = [f.strip() for f in spec.split(",") if f.strip()]
    if not files:
        raise DataError("--file_dataset.data_files is empty: give one or more files, "
                        "comma-separated (JSONL, JSON, Parquet or CSV)")
    kinds = set()
    for file in files:
        if not Path(file).is_file():
            raise DataError(f"--file_dataset.data_files: {file}: no such file")
        if Path(file).suffix not in BUILDERS:
            raise DataError(f"{file}: unknown format {Path(file).suffix!r}; use one of "
                            f"{', '.join(BUILDERS)}")
        kinds.add(BUILDERS[Path(file).suffix])
    if len(kinds) > 1:
        raise DataError(f"--file_dataset.data_files mixes formats ({', '.join(sorted(kinds))}); "
                        "give files of one format")
    return datasets.load_dataset(kinds.pop(), data_files=files, split="train")


def load_files(config, tokenizer, split: str, max_length: int, bad_rows: str, seed: int,
               num_proc: int = 1):
    if split == config.train_split or not config.eval_files:
        rows = read_files(config.data_files)
        if not config.eval_files:
            if not 0 < config.val_split < 1:
                raise DataError("--file_dataset.val_split must be between 0 and 1 (or give "
                                "--file_dataset.eval_files)")
            parts = rows.train_test_split(test_size=config.val_split, seed=seed)
            rows = parts["train"] if split == config.train_split else parts["test"]
    else:
        rows = read_files(config.eval_files)
    if config.messages_column in rows.column_names:
        if tokenizer.chat_template is None:
            raise DataError(f"chat rows ({config.messages_column!r}) need a tokenizer with a chat "
                            "template; set --tokenizer_name to one that has it")

        def to_sample(row):
            return chat_sample(tokenizer, row[config.messages_column], max_length)
    else:
        columns = (config.instruction_column, config.input_column, config.output_column)

        def to_sample(row):
            return instruction_sample(tokenizer, row, max_length, columns)
    return tokenize_rows(rows, to_sample, f"file_dataset {split}", bad_rows, num_proc)
