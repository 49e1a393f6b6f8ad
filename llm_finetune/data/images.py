"""``file_dataset`` rows with images, for a vision-language model:

    {"images": ["a.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "..."}]}]}

Image paths are relative to the file that names them. Rows are tokenised once, as chat rows
are (the processor's chat template, turn by turn, loss on the assistant turns only), and each
image is opened then, so a missing or unreadable one is a bad row reported with its file and
line. Pixels are made per batch: the collator runs the processor on the rendered text and the
images, which gives the model its image inputs (for Llama 3.2 Vision: pixel values, aspect
ratio ids and mask, and the cross-attention mask of the text tokens over the image tiles).
"""

from pathlib import Path

import torch
from PIL import Image

from llm_finetune.data.read import ROW_COLUMN
from llm_finetune.data.rows import BadRow, DataError, turn_tokens

IMAGES_COLUMN = "images"
IGNORE = -100


def image_paths(row: dict, column: str, directory: Path) -> list[str]:
    """The row's images as paths, each an image file that opens."""
    names = row.get(column)
    if not isinstance(names, list) or not names:
        raise BadRow(f"{column!r} must be a non-empty list of image paths")
    paths = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise BadRow(f"{column!r} holds {name!r}, not an image path")
        path = directory / name
        if not path.is_file():
            raise BadRow(f"image {name}: no such file ({path})")
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises several kinds for a broken file
            raise BadRow(f"image {name} cannot be read ({type(error).__name__}: {error})")
        paths.append(str(path.resolve()))
    return paths


def check_messages(messages) -> int:
    """The conversation's structure (text, or lists of image and text parts) and a learnable
    assistant turn; returns how many image parts it has."""
    if not isinstance(messages, list) or not messages:
        raise BadRow("'messages' must be a non-empty list")
    images, learnable = 0, False
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRow(f"message {i} needs 'role' and 'content'")
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise BadRow(f"message {i} content is {type(content).__name__}, not text or a list "
                         "of parts")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                images += 1
            elif kind == "text" and isinstance(part.get("text"), str):
                learnable |= message["role"] == "assistant" and bool(part["text"].strip())
            else:
                raise BadRow(f"message {i} has a part that is neither {{'type': 'image'}} nor "
                             "{'type': 'text', 'text': ...}")
    if not learnable:
        raise BadRow("no non-empty assistant message to learn from")
    return images


def image_sample(processor, row: dict, config, directory: Path, max_length: int) -> dict:
    """One row as input ids, labels (assistant turns), the rendered text and image paths."""
    paths = image_paths(row, IMAGES_COLUMN, directory)
    parts = check_messages(row.get(config.messages_column))
    if parts != len(paths):
        raise BadRow(f"the messages hold {parts} image part(s) and {IMAGES_COLUMN!r} names "
                     f"{len(paths)} image(s): one {{'type': 'image'}} part per image")
    messages = row[config.messages_column]
    input_ids, labels, text = turn_tokens(processor.tokenizer, messages,
                                          processor.apply_chat_template)
    if len(input_ids) > max_length:  # the processor makes the batch from the whole text
        raise BadRow(f"{len(input_ids)} tokens, more than --context_length {max_length}: rows "
                     "with images are not truncated. Raise --context_length")
    return {"input_ids": input_ids, "labels": labels, "text": text, IMAGES_COLUMN: paths,
            "truncated": False}


def image_converter(config, processor, source, max_length: int):
    """``row -> sample`` for rows with images, paths relative to each row's file."""
    if getattr(processor, "chat_template", None) is None:
        raise DataError("rows with images are rendered with the processor's chat template, and "
                        "this processor has none: set --tokenizer_name to a processor that has "
                        "one")
    return lambda row: image_sample(processor, row, config,
                                    Path(source.file_of(row[ROW_COLUMN])).parent, max_length)


def align_labels(ids: list[int], labels: list[int], processed: list[int],
                 image_token: int) -> list[int] | None:
    """``labels`` moved onto the processor's tokens: the same as ``ids``, except that a
    processor may expand each image token into several (LLaVA, Qwen2-VL), which learn nothing.
    None when the tokens differ otherwise."""
    aligned, j = [], 0
    for token in processed:
        if j < len(ids) and token == ids[j]:
            aligned.append(labels[j])
            j += 1
        elif token == image_token and j > 0 and ids[j - 1] == image_token:
            aligned.append(IGNORE)
        else:
            return None
    return aligned if j == len(ids) else None


def image_collate(processor):
    """Batches of rows with images: the processor makes the model's inputs from the rendered
    text and the images (right-padded), and each row's labels are set on its tokens."""
    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_tokens_to_ids(processor.image_token)

    def collate(samples: list[dict]) -> dict:
        images = []
        for sample in samples:
            row_images = []
            for path in sample[IMAGES_COLUMN]:
                with Image.open(path) as image:
                    row_images.append(image.convert("RGB"))
            images.append(row_images)
        batch = dict(processor(text=[s["text"] for s in samples], images=images,
                               add_special_tokens=False, padding=True, return_tensors="pt"))
        labels = torch.full_like(batch["input_ids"], IGNORE)
        for row, sample in enumerate(samples):
            n = int(batch["attention_mask"][row].sum())
            aligned = align_labels(sample["input_ids"], sample["labels"],
                                   batch["input_ids"][row, :n].tolist(), image_token)
            if aligned is None:
                raise DataError(f"{type(processor).__name__} tokenises a row's text differently "
                                "from its chat template rendered turn by turn, so its labels "
                                "cannot be placed: this processor is not supported yet "
                                "(issue #18)")
            labels[row, :n] = torch.tensor(aligned)
        batch["labels"] = labels
        batch["num_tokens"] = batch["attention_mask"].sum()
        return batch

    return collate
