"""``custom_dataset``: a Python file of the user's, as in llama-recipes.

``file="my_data.py:get_dataset"``: the function (default ``get_custom_dataset``) is called as
``fn(dataset_config, tokenizer, split)`` and returns rows (a ``datasets.Dataset``, a list of
dicts, or any sequence of dicts). When the file also defines ``get_data_collator(tokenizer)``
(llama-recipes passes its processor, for a causal LM the tokenizer), the collator it returns
makes every batch, train and eval, from whole rows with all their columns: rows may then hold
anything it reads (raw text, an extra column, images), and it pads and truncates them. Without
one, each row needs ``input_ids`` and ``labels``, and the run pads or packs them.

On a vision model both functions get the model's processor (tokenizer, image processor, chat
template) in the tokenizer's place, as llama-recipes' vision recipe has it
(examples/vision_dataset.py): the collator's batches then carry the image inputs too."""

import importlib.util
from pathlib import Path

import datasets
import torch

from llm_finetune.data.rows import DataError

DATASET_FUNCTION = "get_custom_dataset"
COLLATOR_FUNCTION = "get_data_collator"


def load_module(spec: str):
    """(the module of ``path.py[:function]``, the data set function's name)."""
    path, _, name = spec.partition(":")
    if not path.endswith(".py") or not Path(path).is_file():
        raise DataError(f"--custom_dataset.file {spec}: {path} is not a Python file; "
                        "expected path/to/file.py[:function]")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module, name or DATASET_FUNCTION


def load_function(spec: str):
    module, name = load_module(spec)
    function = getattr(module, name, None)
    if not callable(function):
        raise DataError(f"--custom_dataset.file {spec}: {spec.partition(':')[0]} has no "
                        f"function {name!r}")
    return function


def load_custom(config, tokenizer, split: str, max_length: int,
                collated: bool = False) -> datasets.Dataset:
    """The function's rows of ``split``. ``collated``: the file's collator makes the batches,
    so rows are kept as they are (its columns, its lengths)."""
    data = load_function(config.file)(config, tokenizer, split)
    if isinstance(data, list):
        data = datasets.Dataset.from_list(data) if data else None
    if not isinstance(data, datasets.Dataset) or len(data) == 0:
        raise DataError(f"{config.file} returned {type(data).__name__} for split {split!r}: "
                        "expected a non-empty datasets.Dataset or list of dicts")
    if collated:
        return data
    missing = {"input_ids", "labels"} - set(data.column_names)
    if missing:
        raise DataError(f"{config.file} returned rows without {sorted(missing)} (split "
                        f"{split!r}); each row needs input_ids and labels (-100 = no loss), "
                        f"or the file a {COLLATOR_FUNCTION}(tokenizer) that makes batches of them")
    if any(len(ids) > max_length for ids in data["input_ids"]):
        data = data.map(lambda row: {"input_ids": row["input_ids"][:max_length],
                                     "labels": row["labels"][:max_length]})
    return data


def defines_collator(config) -> bool:
    return callable(getattr(load_module(config.file)[0], COLLATOR_FUNCTION, None))


def custom_collator(config, tokenizer):
    """The batches of the file's ``get_data_collator(tokenizer)``, checked."""
    make = getattr(load_module(config.file)[0], COLLATOR_FUNCTION)
    return CheckedBatches(make(tokenizer), config.file)


class CheckedBatches:
    """A user's collator, whose batches must hold what the trainer reads: ``input_ids`` and
    ``labels`` (tensors or nested lists). Adds ``num_tokens``, the tokens under the attention
    mask (all of ``input_ids`` without one), that tokens/s counts."""

    def __init__(self, collator, file: str):
        self.collator, self.file = collator, file

    def __call__(self, samples: list[dict]) -> dict:
        batch = dict(self.collator(samples))
        missing = {"input_ids", "labels"} - set(batch)
        if missing:
            raise DataError(f"{self.file}: the batches of {COLLATOR_FUNCTION} have no "
                            f"{sorted(missing)}; they need input_ids and labels (-100 = no loss)")
        for key in ("input_ids", "labels", "attention_mask", "position_ids"):
            if key in batch:
                batch[key] = torch.as_tensor(batch[key])
        mask = batch.get("attention_mask")
        batch["num_tokens"] = (mask.sum() if mask is not None
                               else torch.tensor(batch["input_ids"].numel()))
        return batch
