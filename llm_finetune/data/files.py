"""``file_dataset``: the user's own files (JSONL, JSON, Parquet, CSV) in one of two shapes.

- instruction rows: ``{"instruction", "input", "output"}`` (column names configurable), in the
  Alpaca prompt format, loss on the output;
- chat rows: ``{"messages": [{"role", "content"}, ...]}``, rendered with the tokenizer's chat
  template, loss on the assistant turns only;
- chat rows with images (``{"images": [...], "messages": ...}``, each image a path, its bytes,
  or a Parquet column of ``datasets``' ``Image`` feature) for a vision model
  (``data/images.py``).

The eval split is ``eval_files`` if given, else a seeded ``val_split`` fraction of the rows.
"""

from llm_finetune.data.alpaca import instruction_sample
from llm_finetune.data.images import IMAGES_COLUMN, image_converter
from llm_finetune.data.read import read_rows, require_columns
from llm_finetune.data.rows import DataError, chat_sample, tokenize_rows


def read_files(spec: str, setting: str = "--file_dataset.data_files"):
    """(rows, their RowSource) of a comma-separated list of files of one format."""
    files = [f.strip() for f in spec.split(",") if f.strip()]
    if not files:
        raise DataError(f"{setting} is empty: give one or more files, comma-separated (JSONL, "
                        "JSON, Parquet or CSV)")
    return read_rows(files, setting)


def load_files(config, tokenizer, split: str, max_length: int, bad_rows: str, seed: int,
               num_proc: int = 1, processor=None):
    """``processor``: a vision model's, which rows with images need."""
    if split == config.train_split or not config.eval_files:
        rows, source = read_files(config.data_files)
    else:
        rows, source = read_files(config.eval_files, "--file_dataset.eval_files")
    to_sample = row_converter(config, tokenizer, rows, source, max_length, processor)
    if not config.eval_files:
        rows = held_out_part(rows, config, split, seed)
    empty = ({"input_ids": [], "labels": [], "text": "", IMAGES_COLUMN: []}
             if IMAGES_COLUMN in rows.column_names else None)
    return tokenize_rows(rows, to_sample, f"file_dataset {split}", bad_rows, num_proc,
                         where=source.where, empty=empty)


def held_out_part(rows, config, split: str, seed: int):
    """The train rows, or the seeded ``val_split`` fraction held out for evaluation."""
    name = type(config).__name__
    if not 0 < config.val_split < 1:
        raise DataError(f"--{name}.val_split must be between 0 and 1 (or give "
                        f"--{name}.eval_files)")
    try:
        parts = rows.train_test_split(test_size=config.val_split, seed=seed)
    except ValueError as error:  # too few rows for a non-empty train and test part
        raise DataError(f"--{name}.data_files: {len(rows)} rows cannot be split into train "
                        f"and eval parts by --{name}.val_split {config.val_split} ({error})"
                        f": give more rows or --{name}.eval_files") from None
    return parts["train"] if split == config.train_split else parts["test"]


def row_converter(config, tokenizer, rows, source, max_length: int, processor=None):
    """``row -> sample`` for chat rows (a messages column, with images or not) or instruction
    rows, whose columns must be there."""
    if IMAGES_COLUMN in rows.column_names:
        if processor is None:
            raise DataError(f"file_dataset {', '.join(source.files)}: rows with "
                            f"{IMAGES_COLUMN!r} need a vision model (--model_name tiny-mllama, "
                            "or a Llama 3.2 Vision model): this one reads text only")
        return image_converter(config, processor, source, max_length)
    if config.messages_column in rows.column_names:
        if tokenizer.chat_template is None:
            raise DataError(f"chat rows ({config.messages_column!r}) need a tokenizer with a chat "
                            "template; set --tokenizer_name to one that has it")
        return lambda row: chat_sample(tokenizer, row[config.messages_column], max_length)
    columns = (config.instruction_column, config.input_column, config.output_column)
    require_columns(rows, {config.instruction_column: "--file_dataset.instruction_column",
                           config.output_column: "--file_dataset.output_column"},
                    f"file_dataset {', '.join(source.files)} (instruction rows; chat rows "
                    f"need a {config.messages_column!r} column)")
    return lambda row: instruction_sample(tokenizer, row, max_length, columns)
