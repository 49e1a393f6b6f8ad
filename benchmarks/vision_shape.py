"""A random-init Llama-3.2-11B-Vision and image-conversation rows that fill its planned worst
case, for measuring vision fine-tuning on a GPU (benchmarks/device_vision.sh; docs/vision.md).

    python benchmarks/vision_shape.py OUT_DIR [--text_tokens 1900] [--rows 64]

writes OUT_DIR/model: the `llama3.2-11b-vision` shape's config (no weights: runs initialise it
from --seed) with a processor of the real model's image side (560-pixel tiles, at most 4 per
image) and tiny-llama's tokenizer (the real one is on the hub), and OUT_DIR/data/rows.jsonl:
each row one 1120 x 1120 image (2 x 2 tiles, the most an image gets) and a conversation of about
``text_tokens`` tokens, so that a batch is what the planner plans for (one image of the most
tiles per sequence, sequences near --context_length).
"""

import argparse
import json
import random
from pathlib import Path

from PIL import Image
from transformers import AutoProcessor

from llm_finetune.model import BUILTIN_MODELS
from llm_finetune.shapes import SHAPES

SHAPE = "llama3.2-11b-vision"
IMAGE_SIDE = 1120  # two 560-pixel tiles each way: the most tiles (4) an image gets
WORDS = "the a of image text reads line word price title author page total date name".split()


def write_model(directory: Path) -> None:
    config = SHAPES[SHAPE]()
    processor = AutoProcessor.from_pretrained(BUILTIN_MODELS["tiny-mllama"])
    vision = config.vision_config
    processor.image_processor.size = {"height": vision.image_size, "width": vision.image_size}
    processor.image_processor.max_image_tiles = vision.max_num_tiles
    processor.save_pretrained(directory)
    config.save_pretrained(directory)


def conversation(answer: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"},
                                         {"type": "text", "text": "Read all the text in it."}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def answer_of(tokens: int, processor, rng: random.Random) -> str:
    """Random words making about ``tokens`` tokens with the conversation's markup."""
    words = []
    while True:
        words.extend(rng.choice(WORDS) for _ in range(16))
        text = " ".join(words)
        rendered = processor.apply_chat_template(conversation(text), tokenize=False)
        if len(processor.tokenizer(rendered, add_special_tokens=False)["input_ids"]) >= tokens:
            return text


def write_rows(directory: Path, processor, rows: int, text_tokens: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        colour = tuple(rng.randrange(256) for _ in range(3))
        Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), colour).save(directory / f"images/{i}.png")
        messages = conversation(answer_of(text_tokens, processor, rng))
        lines.append(json.dumps({"images": [f"images/{i}.png"], "messages": messages}))
    path = directory / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--text_tokens", type=int, default=1900)
    parser.add_argument("--rows", type=int, default=64)
    args = parser.parse_args()
    write_model(args.out_dir / "model")
    processor = AutoProcessor.from_pretrained(args.out_dir / "model")
    rows = write_rows(args.out_dir / "data", processor, args.rows, args.text_tokens)
    print(f"{SHAPE} (config and processor) in {args.out_dir / 'model'}; {args.rows} rows in {rows}")


if __name__ == "__main__":
    main()
