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

On a vision model a pair may carry images, ``{"images": [...], "prompt": [...], "chosen":
[...], "rejected": [...]}`` in the conversational form, the prompt's messages holding one
``{"type": "image"}`` part per image (paths relative to the file, or image data), as rows with
images have (``data/images.py``): each side is rendered with the processor's chat template,
the images are opened when the rows are tokenised (a missing one is a bad row with its file and line),
a side longer than ``context_length`` is refused rather than cut, and the processor makes each
batch's image inputs, the pair's images given to both of its sequences.
"""

from pathlib import Path

import datasets

from llm_finetune.data.batching import pad_collate
from llm_finetune.data.files import held_out_part, read_files
from llm_finetune.data.images import IMAGES_COLUMN, check_messages, image_collate, row_images
from llm_finetune.data.read import ROW_COLUMN
from llm_finetune.data.rows import (BadRow, DataError, chat_sample, prompt_response_sample,
                                    require_text, tokenize_rows, turn_tokens)

SIDES = ("chosen", "rejected")
COLUMNS = ("prompt", *SIDES)
PAIR_COLUMNS = tuple(f"{side}_{key}" for side in SIDES for key in ("input_ids", "labels"))
# a pair with images also keeps each side's rendered text (the processor tokenises it again
# with the images) and the images (their bytes or paths)
IMAGE_PAIR_COLUMNS = (*PAIR_COLUMNS, *(f"{side}_text" for side in SIDES), IMAGES_COLUMN)


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


def image_pair_sample(processor, row: dict, directory: Path, max_length: int) -> dict:
    """A pair with images: each side's ids, labels (the response only) and rendered text,
    and its images (``row_images``), which the prompt's image parts must match one for one."""
    images = row_images(row, IMAGES_COLUMN, directory)
    if not isinstance(row.get("prompt"), list) or not row["prompt"]:
        raise BadRow("a pair with images is conversational: 'prompt' must be a non-empty list "
                     "of messages, one {'type': 'image'} part in them per image")
    prompt = row["prompt"]
    sample = {IMAGES_COLUMN: images, "truncated": False}
    for side in SIDES:
        messages = prompt + require_messages(row, side)
        try:
            parts = check_messages(messages)
        except BadRow as error:
            raise BadRow(f"prompt + {side!r}: {error}") from None
        if parts != len(images):
            raise BadRow(f"prompt + {side!r} hold {parts} image part(s) and {IMAGES_COLUMN!r} "
                         f"names {len(images)} image(s): one {{'type': 'image'}} part per image")
        input_ids, labels, text = turn_tokens(processor.tokenizer, messages,
                                              processor.apply_chat_template, len(prompt))
        if len(input_ids) > max_length:
            raise BadRow(f"prompt + {side!r}: {len(input_ids)} tokens, more than "
                         f"--context_length {max_length}: pairs with images are not truncated."
                         " Raise --context_length")
        sample.update({f"{side}_input_ids": input_ids, f"{side}_labels": labels,
                       f"{side}_text": text})
    return sample


def require_pair_columns(rows: datasets.Dataset, files: list[str], tokenizer) -> None:
    """The three columns, and a chat template for conversational pairs (``tokenizer``: a
    vision model's processor for pairs with images, which renders them)."""
    present = [c for c in rows.column_names if not c.startswith("_")]
    missing = [c for c in COLUMNS if c not in present]
    if missing:
        raise DataError(f"file_dataset {', '.join(files)}: --method dpo needs preference rows "
                        f"with columns prompt, chosen and rejected; no column "
                        f"{', '.join(map(repr, missing))} (its columns: {', '.join(present)})")
    if (not isinstance(rows.features["prompt"], datasets.Value)
            and getattr(tokenizer, "chat_template", None) is None):
        raise DataError(f"file_dataset {', '.join(files)}: conversational preference rows "
                        "(lists of messages) need a tokenizer with a chat template; set "
                        "--tokenizer_name to one that has it")


def load_pairs(config, tokenizer, split: str, max_length: int, bad_rows: str, seed: int,
               num_proc: int = 1, processor=None) -> datasets.Dataset:
    """The split's tokenised pairs (``PAIR_COLUMNS``, or ``IMAGE_PAIR_COLUMNS`` for pairs with
    images, which need ``processor``, a vision model's): ``eval_files``, or a seeded
    ``val_split`` held out of ``data_files``, as for other file rows."""
    if split == config.train_split or not config.eval_files:
        rows, source = read_files(config.data_files)
    else:
        rows, source = read_files(config.eval_files, "--file_dataset.eval_files")
    with_images = IMAGES_COLUMN in rows.column_names
    if with_images and processor is None:
        raise DataError(f"file_dataset {', '.join(source.files)}: preference pairs with "
                        f"{IMAGES_COLUMN!r} need a vision model (--model_name tiny-mllama, or a "
                        "Llama 3.2 Vision model): this one reads text only")
    require_pair_columns(rows, source.files, processor if with_images else tokenizer)
    columns = IMAGE_PAIR_COLUMNS if with_images else PAIR_COLUMNS

    def to_sample(row: dict) -> dict:
        if with_images:  # image paths are relative to the row's file
            return image_pair_sample(processor, row,
                                     Path(source.file_of(row[ROW_COLUMN])).parent, max_length)
        return pair_sample(tokenizer, row, max_length)

    if not config.eval_files:
        rows = held_out_part(rows, config, split, seed)
    return tokenize_rows(rows, to_sample, f"file_dataset {split} (preference pairs)", bad_rows,
                         num_proc, where=source.where,
                         empty={column: "" if column.endswith("_text") else []
                                for column in columns})


def pair_lengths(samples: datasets.Dataset) -> list[int]:
    """A pair's length for batching: its longer sequence (the batch pads both to it)."""
    return [max(len(chosen), len(rejected)) for chosen, rejected
            in zip(samples["chosen_input_ids"], samples["rejected_input_ids"])]


def pair_tokens(samples: datasets.Dataset) -> list[int]:
    """A pair's real tokens, both sides."""
    return [len(chosen) + len(rejected) for chosen, rejected
            in zip(samples["chosen_input_ids"], samples["rejected_input_ids"])]


def pair_collate(pad_token_id: int, processor=None):
    """One padded batch of the pairs' chosen rows, then their rejected rows; for pairs with
    images, made by ``processor`` as batches of rows with images are (each sequence with its
    pair's images)."""
    if processor is not None:
        images = image_collate(processor)
        return lambda pairs: images([
            {"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"],
             "text": pair[f"{side}_text"], IMAGES_COLUMN: pair[IMAGES_COLUMN]}
            for side in SIDES for pair in pairs])
    pad = pad_collate(pad_token_id)

    def collate(pairs: list[dict]) -> dict:
        return pad([{"input_ids": pair[f"{side}_input_ids"], "labels": pair[f"{side}_labels"]}
                    for side in SIDES for pair in pairs])

    return collate
