"""A custom data set: any Python function that returns tokenised rows.

    python -m llm_finetune.finetuning --dataset custom_dataset \
        --custom_dataset.file examples/custom_dataset.py:get_custom_dataset

llm_finetune calls ``get_custom_dataset(dataset_config, tokenizer, split)`` with split
"train" or "validation" and expects rows of ``input_ids`` and ``labels`` (-100 where no loss:
here the question). Build them however your data needs; this one makes arithmetic questions.
"""

import random


def get_custom_dataset(dataset_config, tokenizer, split):
    rng = random.Random(0 if split == "train" else 1)
    rows = []
    for _ in range(400 if split == "train" else 40):
        a, b = rng.randrange(100), rng.randrange(100)
        question = tokenizer.encode(f"Q: {a} + {b} = ?\nA: ", add_special_tokens=False)
        answer = tokenizer.encode(str(a + b), add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append({"input_ids": [tokenizer.bos_token_id] + question + answer,
                     "labels": [-100] * (1 + len(question)) + answer})
    return rows
