"""Preference pairs for ``--method dpo``, from the files of ``--dataset file_dataset``.

Each row is ``{"prompt", "chosen", "rejected"}``, in one of TRL's two forms:

- text: the prompt is used as it is (write it in the format the model was fine-tuned on), each
  response follows it, ``<bos> prompt response <eos>``;
- conversational: lists of ``{"role", "content"}`` messages, the prompt's then each response's,
  rendered with the tokenizer's chat template as chat rows are (``rows.chat_sample``).

A pair becomes two samples, prompt + chosen and prompt + rejected, with the prompt masked out
of the loss (-100). Longer than ``context_length``, the prompt is kept and the response cut; a
response with no token left is a bad row (``--bad_rows``), named by file and line. The collate
puts a batch's chosen rows first and its rejected rows second, one padded batch, so one forward
scores both (``preference.PreferenceLoss``).
"""

import datasets

from llm_finetune.data.batching import pad_collate
from llm_finetune.data.files import held_out_part, read_files
from llm_finetune.data.rows import (BadRow, DataError, chat_sample, prompt_response_sample,
                                    require_text, tokenize_rows)

SIDES = ("chosen", "rejected")
COLUMNS = ("prompt", *SIDES)
PAIR_COLUMNS = tuple(f"{side}_{key}" for side in SIDES for key in ("input_ids", "labels"))


def require_messages(row: dict, field: str) -> list:
    value = row.get(field)
    if not isinstance(value, list) or not value:
        raise BadRow(f"field {field!r} must be a non-empty list of messages, like the prompt's")
    return value


def response_sample(tokenizer, row: dict, side: str, max_length: int) -> dict:
    """prompt + the ``side`` response, labels on the response only."""
    if isinstance(row.get("prompt"), list):
        prompt = require_messages(row, "prompt")
        try:
            return chat_sample(tokenizer, prompt + require_messages(row, side), max_length,
                               prompt_messages=len(prompt))
        except BadRow as error:
            raise BadRow(f"prompt + {side!r}: {error}") from None
    return prompt_response_sample(tokenizer, require_text(row, "prompt", allow_empty=True),
                                  require_text(row, side), max_length)


def pair_sample(tokenizer, row: dict, max_length: int) -> dict:
    sample = {"truncated": False}
    for side in SIDES:
        tokens = response_sample(tokenizer, row, side, max_length)
        if all(label == -100 for label in tokens["labels"][1:]):
            raise BadRow(f"the prompt fills --context_length {max_length}: no token of the "
                         f"{side!r} response is left. Raise --context_length")
        sample[f"{side}_input_ids"] = tokens["input_ids"]
        sample[f"{side}_labels"] = tokens["labels"]
        sample["truncated"] |= tokens["truncated"]
    return sample


def require_pair_columns(rows: datasets.Dataset, files: list[str], tokenizer) -> None:
    present = [c for c in rows.column_names if not c.startswith("_")]
    missing = [c for c in COLUMNS if c not in present]
    if missing:
        raise DataError(f"file_dataset {', '.join(files)}: --method dpo needs preference rows "
                        f"with columns prompt, chosen and rejected; no column "
                        f"{', '.join(map(repr, missing))} (its columns: {', '.join(present)})")
    if not isinstance(rows.features["prompt"], datasets.Value) and tokenizer.chat_template is None:
        raise DataError(f"file_dataset {', '.join(files)}: conversational preference rows "
                        "(lists of messages) need a tokenizer with a chat template; set "
                        "--tokenizer_name to one that has it")


def load_pairs(config, tokenizer, split: str, max_length: int, bad_rows: str, seed: int,
               num_proc: int = 1) -> datasets.Dataset:
    """The split's tokenised pairs (``PAIR_COLUMNS``): ``eval_files``, or a seeded
    ``val_split`` held out of ``data_files``, as for other file rows."""
    if split == config.train_split or not config.eval_files:
        rows, source = read_files(config.data_files)
    else:
        rows, source = read_files(config.eval_files, "--file_dataset.eval_files")
    require_pair_columns(rows, source.files, tokenizer)
    if not config.eval_files:
        rows = held_out_part(rows, config, split, seed)
    return tokenize_rows(rows, lambda row: pair_sample(tokenizer, row, max_length),
                         f"file_dataset {split} (preference pairs)", bad_rows, num_proc,
                         where=source.where, empty={column: [] for column in PAIR_COLUMNS})


def pair_lengths(samples: datasets.Dataset) -> list[int]:
    """A pair's length for batching: its longer sequence (the batch pads both to it)."""
    return [max(len(chosen), len(rejected)) for chosen, rejected
            in zip(samples["chosen_input_ids"], samples["rejected_input_ids"])]


def pair_tokens(samples: datasets.Dataset) -> list[int]:
    """A pair's real tokens, both sides."""
    return [len(chosen) + len(rejected) for chosen, rejected
            in zip(samples["chosen_input_ids"], samples["rejected_input_ids"])]


def pair_collate(pad_token_id: int):
    """One padded batch of the pairs' chosen rows, then their rejected rows."""
    pad = pad_collate(pad_token_id)

    def collate(pairs: list[dict]) -> dict:
        return pad([{"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}
                    for side in SIDES for pair in pairs])

    return collate
