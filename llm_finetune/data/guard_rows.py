"""Llama Guard data sets: rows become examples, the formatter (``llama_guard``) makes each into
one or more prompt/verdict pairs, and those are tokenised with a loss on the verdict only.

Why only the verdict: the prompt is mostly the same instructions and category list in every
sample; trained on it (as llama-recipes' toxicchat recipe does, labels = input ids), most of the
gradient goes to reproducing that fixed text, which a classifier never has to write, and the few
verdict tokens that decide safe or unsafe get a small share of it.

``llama_guard_dataset`` reads the user's files (llama-recipes' ``TrainingExample`` fields);
``llamaguard_toxicchat_dataset`` (``toxicchat``) maps toxic-chat's columns onto examples. A row
that cannot become an example (no prompt, a label that is neither safe nor unsafe, an unknown
category code) is a bad row, reported with its file and line (``rows.tokenize_rows``).
"""

from dataclasses import replace

from llm_finetune.data.files import held_out_part, read_files
from llm_finetune.data.llama_guard import (TEMPLATES, FormatterConfig, GuardExample,
                                           check_config, example_rng, load_guidelines, variants)
from llm_finetune.data.read import ROW_COLUMN
from llm_finetune.data.rows import (BadRow, DataError, prompt_response_sample, require_text,
                                    tokenize_rows)
from llm_finetune.errors import ConfigError

GUARD_DATASETS = ("llama_guard_dataset", "llamaguard_toxicchat_dataset")


def formatter_settings(config) -> tuple:
    """(Guidelines, FormatterConfig) of a Llama Guard data set's config."""
    guidelines = load_guidelines(config.categories, getattr(config, "category_code_prefix", "S"))
    formatter = FormatterConfig(
        template=TEMPLATES.get(config.prompt_template, config.prompt_template),
        include_descriptions=config.include_descriptions,
        explanation_position=getattr(config, "explanation_position", "none"),
        shuffle_categories=config.shuffle_categories, drop_categories=config.drop_categories,
        drop_violated_categories=config.drop_violated_categories,
        safe_explanation=getattr(config, "safe_explanation", ""))
    return guidelines, formatter


def check_guard_settings(run) -> None:
    """The template, the categories and the explanation settings can work, before loading."""
    name = run.train.dataset
    if name not in GUARD_DATASETS:
        return
    if name == "llama_guard_dataset" and not run.dataset.data_files:
        raise ConfigError("--dataset llama_guard_dataset needs --llama_guard_dataset.data_files "
                          "PATH[,PATH...] (rows of prompt, response, label, "
                          "violated_category_codes, explanation: docs/datasets.md)")
    try:
        _, formatter = formatter_settings(run.dataset)
    except ValueError as error:
        raise ConfigError(f"--{name}.categories: {error}. Give llama_guard_3, "
                          "llama_guard_3_1b or a JSON file of categories") from None
    try:
        check_config(formatter)
    except ValueError as error:  # "setting: problem"
        raise ConfigError(f"--{name}.{error}") from None


def example_from_row(row: dict) -> GuardExample:
    """A row of the user's file as an example; BadRow when a field has the wrong kind."""
    response = row.get("response")
    if response is not None and not isinstance(response, str):
        raise BadRow(f"field 'response' is {type(response).__name__}, not text")
    codes = row.get("violated_category_codes") or []
    if isinstance(codes, str):  # CSV cells: "S1,S3"
        codes = [c.strip() for c in codes.split(",") if c.strip()]
    if not isinstance(codes, list) or not all(isinstance(c, str) for c in codes):
        raise BadRow("field 'violated_category_codes' must be a list of codes like "
                     "[\"S1\", \"S3\"] (or the text \"S1,S3\")")
    explanation = row.get("explanation") or ""
    if not isinstance(explanation, str):
        raise BadRow(f"field 'explanation' is {type(explanation).__name__}, not text")
    response = (response or "").strip()
    return GuardExample(prompt=require_text(row, "prompt"),
                        label=require_text(row, "label").strip().lower(),
                        response="" if response == "N/A" else response,
                        violated_category_codes=codes, explanation=explanation)


def tokenize_examples(rows, to_example, config, tokenizer, split: str, max_length: int,
                      bad_rows: str, seed: int, num_proc: int = 1, where=None):
    """Samples of every variant of every row's example; augmentation on the train split only.
    A row's variants come from its own generator (``seed`` and the row's place in its file),
    so they do not change with ``num_proc`` or with the rows around it."""
    name = f"{type(config).__name__} {split}"
    guidelines, formatter = formatter_settings(config)
    if split != config.train_split:
        formatter = replace(formatter, shuffle_categories=False, drop_categories=False,
                            drop_violated_categories=False)
    if ROW_COLUMN not in rows.column_names:
        rows = rows.add_column(ROW_COLUMN, list(range(len(rows))))

    def to_samples(row):
        pairs = variants(to_example(row), guidelines, formatter, example_rng(seed, row[ROW_COLUMN]))
        samples = [prompt_response_sample(tokenizer, p, r, max_length) for p, r in pairs]
        return {"input_ids": [s["input_ids"] for s in samples],
                "labels": [s["labels"] for s in samples],
                "truncated": any(s["truncated"] for s in samples)}

    grouped = tokenize_rows(rows, to_samples, name, bad_rows, num_proc, where=where)
    return grouped.map(lambda batch: {column: [one for group in batch[column] for one in group]
                                      for column in ("input_ids", "labels")},
                       batched=True, remove_columns=grouped.column_names,
                       desc=f"augmented samples of {name}")


def load_llama_guard(config, tokenizer, split: str, max_length: int, bad_rows: str, seed: int,
                     num_proc: int = 1):
    """``llama_guard_dataset``: the user's files, the eval split held out as in file_dataset."""
    setting = "--llama_guard_dataset.data_files"
    if split == config.train_split or not config.eval_files:
        rows, source = read_files(config.data_files, setting)
    else:
        setting = "--llama_guard_dataset.eval_files"
        rows, source = read_files(config.eval_files, setting)
    present = [c for c in rows.column_names if c != ROW_COLUMN]
    for column in ("prompt", "label"):
        if column not in present:
            raise DataError(f"{setting} {', '.join(source.files)}: no column {column!r} (its "
                            f"columns: {', '.join(present)}); Llama Guard rows have prompt, "
                            "label and optionally response, violated_category_codes, explanation")
    if not config.eval_files:
        rows = held_out_part(rows, config, split, seed)
    return tokenize_examples(rows, example_from_row, config, tokenizer, split, max_length,
                             bad_rows, seed, num_proc, where=source.where)
