"""Regenerate the shipped preference pairs, ``llm_finetune/assets/data/tiny_preferences.jsonl``:
rows of ``{"prompt", "chosen", "rejected"}`` for ``--method dpo`` examples and tests.

Prompts are in the Alpaca format of ``tiny_alpaca.json`` (the shipped SFT data), so DPO can
follow SFT on the same model. A fifth of the pairs are additions of two digits, the correct sum
chosen and a sum off by one to three rejected; the others are answers in the asked-for form
chosen (capital letters, a word spelt letter by letter) against the same words left as they
were. The sums are the hard part for a few-million-parameter model; the forms it learns to tell
apart within a minute on CPU, so a rising reward accuracy on held-out pairs is a real signal
(the tests' DPO run). Run ``python tools/make_tiny_preferences.py`` to rebuild; the output is
deterministic.
"""

import json
import random
from pathlib import Path

from llm_finetune.data.alpaca import format_prompt

OUT = Path(__file__).resolve().parent.parent / "llm_finetune" / "assets" / "data"
WORDS = (
    "apple river stone cloud green quiet morning window garden silver paper bread music "
    "yellow winter summer mountain ocean forest candle bridge market doctor letter orange"
).split()


def addition(rng: random.Random) -> dict:
    a, b = rng.randrange(10), rng.randrange(10)
    wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
    wrong = wrong if wrong >= 0 else a + b + 4
    return {"prompt": format_prompt(f"What is {a} + {b}?", ""),
            "chosen": f"{a} + {b} = {a + b}.", "rejected": f"{a} + {b} = {wrong}."}


def capitals(rng: random.Random) -> dict:
    words = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
    return {"prompt": format_prompt(f"Write this in capital letters: {words}", ""),
            "chosen": words.upper(), "rejected": words}


def spelling(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return {"prompt": format_prompt(f"Spell the word {word} letter by letter.", ""),
            "chosen": "-".join(word), "rejected": word}


def main() -> None:
    rng = random.Random(0)
    rows = [rng.choice((addition, capitals, capitals, spelling, spelling))(rng)
            for _ in range(800)]
    path = OUT / "tiny_preferences.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"{len(rows)} pairs written to {path}")


if __name__ == "__main__":
    main()
