"""A custom vision data set in the form of llama-recipes' OCRVQA recipe: the file defines
``get_custom_dataset(dataset_config, processor, split)`` and ``get_data_collator(processor)``,
and the run hands both the vision model's processor.

    python tools/make_colour_images.py colours
    python -m llm_finetune.finetuning --model_name tiny-mllama --dataset custom_dataset \\
        --custom_dataset.file examples/vision_dataset.py \\
        --custom_dataset.data_path colours/texts.jsonl

Rows are read from local files, nothing is downloaded: ``data_path`` is a JSON-lines file of
rows laid out as the_cauldron's (the OCRVQA recipe's source), image paths relative to it:

    {"images": ["images/0.png"], "texts": [{"user": "What colour is this?", "assistant": "red"}]}

Each row is one conversation about its first image; the image goes with the first question,
later pairs of ``texts`` are follow-up turns. The collator renders the conversations with the
processor's chat template, lets the processor make the image inputs, and puts the loss on the
assistant's answers only (found by rendering each conversation up to and after each answer,
not by token ids of one tokenizer).
"""

import json
from pathlib import Path

import datasets
import torch

IGNORE = -100  # no loss on this token


def get_custom_dataset(dataset_config, processor, split, split_ratio=0.9):
    """The rows of ``dataset_config.data_path``, images decoded on access; a seeded
    ``split_ratio`` of them for "train", the rest for any other split."""
    path = Path(dataset_config.data_path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    data = datasets.Dataset.from_list(
        [{"images": [str(path.parent / name) for name in row["images"]], "texts": row["texts"]}
         for row in rows])
    data = data.cast_column("images", datasets.Sequence(datasets.Image()))
    halves = data.train_test_split(test_size=1 - split_ratio, shuffle=True, seed=42)
    return halves["train" if split == "train" else "test"]


def conversation(texts: list[dict]) -> list[dict]:
    """the_cauldron's user/assistant pairs as chat messages, the image in the first turn."""
    messages = []
    for pair in texts:
        question = [{"type": "text", "text": pair["user"].strip()}]
        if not messages:
            question.insert(0, {"type": "image"})
        messages += [{"role": "user", "content": question},
                     {"role": "assistant",
                      "content": [{"type": "text", "text": pair["assistant"].strip()}]}]
    return messages


class VisionQACollator:
    def __init__(self, processor):
        self.processor = processor
        processor.tokenizer.padding_side = "right"  # training pads on the right

    def tokens(self, messages: list[dict], generation_prompt: bool = False) -> int:
        text = self.processor.apply_chat_template(messages,
                                                  add_generation_prompt=generation_prompt)
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def answer_spans(self, messages: list[dict]) -> list[tuple[int, int]]:
        """Where each assistant answer lies among the conversation's tokens."""
        return [(self.tokens(messages[:i], generation_prompt=True), self.tokens(messages[:i + 1]))
                for i, message in enumerate(messages) if message["role"] == "assistant"]

    def __call__(self, samples: list[dict]) -> dict:
        dialogs = [conversation(sample["texts"]) for sample in samples]
        images = [[sample["images"][0].convert("RGB")] for sample in samples]
        texts = [self.processor.apply_chat_template(dialog) for dialog in dialogs]
        batch = self.processor(images=images, text=texts, padding=True, return_tensors="pt",
                               add_special_tokens=False)
        labels = torch.full_like(batch["input_ids"], IGNORE)
        for row, dialog in enumerate(dialogs):
            for start, end in self.answer_spans(dialog):
                labels[row, start:end] = batch["input_ids"][row, start:end]
        batch["labels"] = labels
        return batch


def get_data_collator(processor):
    return VisionQACollator(processor)
