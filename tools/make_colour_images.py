"""Write a small image-caption data set for vision fine-tuning: solid-colour images of a few
shapes, each row asking for the colour, so the answer can only be learned from the image.

    python tools/make_colour_images.py OUT_DIR [ROWS]

writes OUT_DIR/images/N.png and OUT_DIR/rows.jsonl (image paths relative to it), the rows
docs/vision.md trains tiny-mllama on, OUT_DIR/texts.jsonl, the same rows in the layout of
llama-recipes' OCRVQA data (the_cauldron's: images and user/assistant texts), which
examples/vision_dataset.py reads, and OUT_DIR/pairs.jsonl, preference pairs about the same
images for --method dpo (the right colour chosen, another rejected); tests/test_vision.py uses
the same functions.
"""

import json
import random
import sys
from pathlib import Path

from PIL import Image

COLOURS = {"red": (255, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 255),
           "yellow": (255, 255, 0)}
QUESTION = "What colour is this?"
SIZES = [(32, 32), (48, 24), (24, 48)]  # with 32-pixel tiles: one tile, two across, two down


def conversation(answer: str | None) -> list[dict]:
    """The question about one image, and the answer when given."""
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def write_colour_rows(directory: Path, rows: int = 64, seed: int = 0) -> Path:
    """``rows`` images of seeded random colours and shapes, and the rows.jsonl naming them (and
    texts.jsonl, the same rows as llama-recipes' OCRVQA recipe lays them out, and pairs.jsonl,
    preference pairs about them)."""
    rng = random.Random(seed)
    wrong = random.Random(seed + 1)  # the rejected colours, leaving the images' draws alone
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines, cauldron, pairs = [], [], []
    for i in range(rows):
        name = rng.choice(sorted(COLOURS))
        Image.new("RGB", rng.choice(SIZES), COLOURS[name]).save(directory / f"images/{i}.png")
        lines.append({"images": [f"images/{i}.png"], "messages": conversation(name)})
        cauldron.append({"images": [f"images/{i}.png"],
                         "texts": [{"user": QUESTION, "assistant": name}]})
        rejected = wrong.choice(sorted(set(COLOURS) - {name}))
        pairs.append({"images": [f"images/{i}.png"], "prompt": conversation(None),
                      "chosen": conversation(name)[1:], "rejected": conversation(rejected)[1:]})
    (directory / "texts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in cauldron))
    (directory / "pairs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    path = directory / "rows.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


if __name__ == "__main__":
    written = write_colour_rows(Path(sys.argv[1]), *(int(n) for n in sys.argv[2:3]))
    print(f"wrote {written} (rows), and beside it pairs.jsonl (preference pairs), texts.jsonl "
          "(the OCRVQA recipe's layout) and images/")
