"""``custom_dataset``: a Python function of the user's, ``file="my_data.py:get_dataset"``
(llama-recipes convention; the function defaults to ``get_custom_dataset``). It is called as
``fn(dataset_config, tokenizer, split)`` and returns rows with ``input_ids`` and ``labels``
(a ``datasets.Dataset``, a list of dicts, or any sequence of dicts)."""

import importlib.util
from pathlib import Path

import datasets

from llm_finetune.data.rows import DataError


def load_function(spec: str):
    path, _, name = spec.partition(":")
    name = name or "get_custom_dataset"
    if not path.endswith(".py") or not Path(path).is_file():
        raise DataError(f"--custom_dataset.file {spec}: {path} is not a Python file; "
                        "expected path/to/file.py[:function]")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    function = getattr(module, name, None)
    if not callable(function):
        raise DataError(f"--custom_dataset.file {spec}: {path} has no function {name!r}")
    return function


def load_custom(config, tokenizer, split: str, max_length: int) -> datasets.Dataset:
    function = load_function(config.file)
    data = function(config, tokenizer, split)
    if isinstance(data, list):
        data = datasets.Dataset.from_list(data) if data else None
    if not isinstance(data, datasets.Dataset) or len(data) == 0:
        raise DataError(f"{config.file} returned {type(data).__name__} for split {split!r}: "
                        "expected a non-empty datasets.Dataset or list of dicts")
    missing = {"input_ids", "labels"} - set(data.column_names)
    if missing:
        raise DataError(f"{config.file} returned rows without {sorted(missing)} (split "
                        f"{split!r}); each row needs input_ids and labels (-100 = no loss)")
    if any(len(ids) > max_length for ids in data["input_ids"]):
        data = data.map(lambda row: {"input_ids": row["input_ids"][:max_length],
                                     "labels": row["labels"][:max_length]})
    return data
