"""tiny_mc: multiple choice on the tiny model's own task types (a local lm-eval task).

Each document is a row of the shipped data's eval split (its first 5%, which training never
sees): an instruction, and four answers, its own and three from rows of other types (a spelled
word against a sum, a sorted list, ...). A model that learned which kind of answer each
instruction asks for picks its own; a random model picks by length. ``tiny_mc.jsonl`` is made
by running this file (``python examples/eval_tasks/tiny_mc/tiny_mc.py``); lm-eval reads it
through ``load`` (``custom_dataset`` in tiny_mc.yaml), so the task needs no download.
"""

import json
import random
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent
DOCS = HERE / "tiny_mc.jsonl"
SHIPPED = HERE.parents[2] / "llm_finetune" / "assets" / "data" / "tiny_alpaca.json"
PER_TYPE = 4


def load(**_) -> datasets.DatasetDict:
    """The documents as lm-eval's ``custom_dataset`` wants them (extra metadata ignored)."""
    rows = [json.loads(line) for line in DOCS.read_text().splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def kind(row: dict) -> str:
    """The row's task type: its instruction's first words ("What is 3 + 4?": a sum)."""
    return "sum" if "+" in row["instruction"] else " ".join(row["instruction"].split()[:3])


def make() -> list[dict]:
    rows = json.loads(SHIPPED.read_text())
    eval_split = rows[:len(rows) // 20]  # the rows llm_finetune holds out (data/alpaca.py)
    by_kind: dict[str, list[dict]] = {}
    for row in eval_split:
        by_kind.setdefault(kind(row), []).append(row)
    kinds = sorted(k for k, v in by_kind.items() if len(v) >= PER_TYPE + 3)
    rng = random.Random(0)
    docs = []
    for k in kinds:
        for row in by_kind[k][:PER_TYPE]:
            others = rng.sample([o for o in kinds if o != k], 3)
            choices = [row["output"]] + [rng.choice(by_kind[o][PER_TYPE:])["output"]
                                         for o in others]
            rng.shuffle(choices)
            docs.append({"instruction": row["instruction"], "input": row["input"],
                         "choices": choices, "answer": choices.index(row["output"])})
    return docs


if __name__ == "__main__":
    DOCS.write_text("".join(json.dumps(doc) + "\n" for doc in make()))
