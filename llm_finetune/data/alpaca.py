"""Instruction data in the Stanford Alpaca format: ``{"instruction", "input", "output"}`` rows.

Each row becomes ``<bos> prompt response <eos>`` with the prompt's labels set to -100, so the
loss is taken on the response only.
"""

import datasets

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(row: dict) -> str:
    template = PROMPT_WITH_INPUT if row.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=row["instruction"], input=row.get("input", ""))


def tokenize_prompt_response(tokenizer, prompt: str, response: str, max_length: int) -> dict:
    """Token ids and labels for one sample; the prompt part is masked out of the loss."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + prompt_ids
    response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels,
            "truncated": len(prompt_ids) + len(response_ids) > max_length}


def load_alpaca(dataset_config, tokenizer, split: str, max_length: int) -> datasets.Dataset:
    rows = datasets.load_dataset("json", data_files=dataset_config.data_path, split="train")
    missing = {"instruction", "output"} - set(rows.column_names)
    if missing:
        raise ValueError(f"{dataset_config.data_path}: alpaca rows need the fields "
                         f"{sorted(missing)}; found {rows.column_names}")
    eval_size = dataset_config.eval_size
    if split == dataset_config.train_split:
        rows = rows.select(range(eval_size, len(rows)))
    else:
        rows = rows.select(range(min(eval_size, len(rows))))

    def tokenize(row):
        return tokenize_prompt_response(tokenizer, format_prompt(row), row["output"], max_length)

    return rows.map(tokenize, remove_columns=rows.column_names, desc=f"tokenize {split}")
