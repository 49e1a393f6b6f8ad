"""``file_dataset`` rows with images, for a vision-language model:

    {"images": ["a.png", "b.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", ...}]},
        {"role": "assistant", "content": [{"type": "text", "text": "..."}]}]}

An image is a path (relative to the file that names it), image data (the encoded file's bytes,
as a Parquet binary column holds them) or ``{"bytes", "path"}``, the form ``datasets`` gives its
``Image`` feature (bytes None when the path is given). Rows are tokenised once, as chat rows are
(the processor's chat template, turn by turn, loss on the assistant turns only), and each image
is opened then, so a missing or unreadable one is a bad row reported with its file and line.
The tokenised samples keep each image as ``datasets`` stores one, its encoded bytes or its
file's path, never pixels. Pixels are made per batch: the collator decodes the images and runs
the processor on the rendered text and the images, which gives the model its image inputs (for
Llama 3.2 Vision: pixel values, aspect ratio ids and mask, and the cross-attention mask of the
text tokens over each image's tiles).
"""

import io
from pathlib import Path

import pyarrow.compute
import torch
from PIL import Image

from llm_finetune.data.read import ROW_COLUMN
from llm_finetune.data.rows import BadRow, DataError, turn_tokens

IMAGES_COLUMN = "images"
IGNORE = -100


def row_images(row: dict, column: str, directory: Path) -> list[dict]:
    """The row's images, each checked to open, as ``{"bytes", "path"}``: its encoded bytes,
    or the resolved path of its file. The unused field is empty, not None, so the samples'
    column has one Arrow type whichever rows come first."""
    given = row.get(column)
    if not isinstance(given, list) or not given:
        raise BadRow(f"{column!r} must be a non-empty list of images (paths or image data)")
    return [stored_image(image, column, directory) for image in given]


def stored_image(image, column: str, directory: Path) -> dict:
    """One image of a row: a path, bytes, or ``datasets``' ``{"bytes", "path"}`` (its bytes,
    when there are any, are the image; its path then only names it)."""
    given, name = image, None
    if isinstance(image, dict):
        data, name = image.get("bytes"), image.get("path")
        if data is not None and not isinstance(data, bytes):
            raise BadRow(f"an image's 'bytes' in {column!r} holds {type(data).__name__}, not "
                         "image data")
        image = data or name
    if isinstance(image, bytes):
        label = f"image {name or f'data ({len(image)} bytes)'}"
        check_opens(io.BytesIO(image), label)
        return {"bytes": image, "path": ""}
    if not isinstance(image, str) or not image.strip():
        raise BadRow(f"{column!r} holds {repr(given)[:80]}, not an image path or image data")
    path = directory / image
    if not path.is_file():
        raise BadRow(f"image {image}: no such file ({path})")
    check_opens(path, f"image {image}")
    return {"bytes": b"", "path": str(path.resolve())}


def check_opens(source, label: str) -> None:
    try:
        with Image.open(source) as image:
            image.verify()
    except Exception as error:  # PIL raises several kinds for a broken file
        reason = str(error).replace(repr(source), "(given as bytes)")  # not "<_io.BytesIO ...>"
        raise BadRow(f"{label} cannot be read ({type(error).__name__}: {reason})") from None


def open_image(image: dict) -> Image.Image:
    """A stored image (``row_images``) decoded, in RGB."""
    with Image.open(io.BytesIO(image["bytes"]) if image["bytes"] else image["path"]) as opened:
        return opened.convert("RGB")


def most_images(samples) -> int:
    """The most images a sample of ``samples`` has, from the Arrow column's list lengths (the
    images themselves are not read; rows a filter hid, dropped bad rows, do not count)."""
    lengths = pyarrow.compute.list_value_length(samples.data.column(IMAGES_COLUMN))
    rows = getattr(samples, "_indices", None)  # a filter's or split's view of the table
    if rows is not None:
        lengths = pyarrow.compute.take(lengths, rows.column(0))
    return pyarrow.compute.max(lengths).as_py() or 0


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
    """One row as input ids, labels (assistant turns), the rendered text and its images
    (``row_images``)."""
    images = row_images(row, IMAGES_COLUMN, directory)
    parts = check_messages(row.get(config.messages_column))
    if parts != len(images):
        raise BadRow(f"the messages hold {parts} image part(s) and {IMAGES_COLUMN!r} names "
                     f"{len(images)} image(s): one {{'type': 'image'}} part per image")
    messages = row[config.messages_column]
    input_ids, labels, text = turn_tokens(processor.tokenizer, messages,
                                          processor.apply_chat_template)
    if len(input_ids) > max_length:  # the processor makes the batch from the whole text
        raise BadRow(f"{len(input_ids)} tokens, more than --context_length {max_length}: rows "
                     "with images are not truncated. Raise --context_length")
    return {"input_ids": input_ids, "labels": labels, "text": text, IMAGES_COLUMN: images,
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
    text and the images, decoded here (right-padded; a row with fewer images than another has
    no tiles in the cross-attention mask for the ones it lacks), and each row's labels are set
    on its tokens."""
    tokenizer = processor.tokenizer
    image_token = tokenizer.convert_tokens_to_ids(processor.image_token)

    def collate(samples: list[dict]) -> dict:
        images = [[open_image(image) for image in sample[IMAGES_COLUMN]] for sample in samples]
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
