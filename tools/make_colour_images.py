"""Write a small image-caption data set for vision fine-tuning: solid-colour images of a few
shapes, each row asking for the colour, so the answer can only be learned from the image.

    python tools/make_colour_images.py OUT_DIR [ROWS]

writes OUT_DIR/images/N.png and OUT_DIR/rows.jsonl (image paths relative to it), the rows
docs/vision.md trains tiny-mllama on; tests/test_vision.py uses the same functions.
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
    """``rows`` images of seeded random colours and shapes, and the rows.jsonl naming them."""
    rng = random.Random(seed)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        name = rng.choice(sorted(COLOURS))
        Image.new("RGB", rng.choice(SIZES), COLOURS[name]).save(directory / f"images/{i}.png")
        lines.append({"images": [f"images/{i}.png"], "messages": conversation(name)})
    path = directory / "rows.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


if __name__ == "__main__":
    written = write_colour_rows(Path(sys.argv[1]), *(int(n) for n in sys.argv[2:3]))
    print(f"wrote {written}")
