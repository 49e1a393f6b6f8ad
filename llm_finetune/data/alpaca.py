"""Instruction data in the Stanford Alpaca format: ``{"instruction", "input", "output"}`` rows,
from a local JSON file (``data_path``); the first 5% of the rows are the eval split, as in
llama-recipes."""

import datasets

from llm_finetune.data.read import read_rows, require_columns
from llm_finetune.data.rows import DataError, prompt_response_sample, require_text, tokenize_rows

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, context: str) -> str:
    template = PROMPT_WITH_INPUT if context else PROMPT_NO_INPUT
    return template.format(instruction=instruction, input=context)


def instruction_sample(tokenizer, row: dict, max_length: int, columns=("instruction", "input",
                                                                        "output")) -> dict:
    instruction_col, input_col, output_col = columns
    instruction = require_text(row, instruction_col)
    context = require_text(row, input_col, allow_empty=True) if row.get(input_col) else ""
    response = require_text(row, output_col)
    return prompt_response_sample(tokenizer, format_prompt(instruction, context), response,
                                  max_length)


def eval_rows(total: int) -> int:
    """How many leading rows form the eval split: 5%, rounded down (llama-recipes)."""
    return total // 20


def load_alpaca(dataset_config, tokenizer, split: str, max_length: int, bad_rows: str,
                num_proc: int = 1) -> datasets.Dataset:
    setting = "--alpaca_dataset.data_path"
    rows, source = read_rows([dataset_config.data_path], setting)
    require_columns(rows, {"instruction": setting, "output": setting},
                    f"alpaca_dataset {dataset_config.data_path}")
    eval_size = eval_rows(len(rows))
    if split == dataset_config.train_split:
        rows = rows.select(range(eval_size, len(rows)))
    elif eval_size == 0:
        raise DataError(f"--alpaca_dataset.data_path {dataset_config.data_path}: {len(rows)} rows "
                        "leave no eval split (its first 5%): give at least 20 rows, or "
                        "--run_validation False")
    else:
        rows = rows.select(range(eval_size))
    return tokenize_rows(rows, lambda row: instruction_sample(tokenizer, row, max_length),
                         f"alpaca_dataset {split}", bad_rows, num_proc, where=source.where)
