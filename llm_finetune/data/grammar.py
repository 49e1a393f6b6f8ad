"""``grammar_dataset``: grammar correction in llama-recipes' prompt.

llama-recipes trains on CSVs of ``input,target`` rows that its notebook makes from jfleg (its
validation split for training, its test split for evaluation). jfleg's own rows are a
``sentence`` with four ``corrections``, written as tokenised text (spaces before punctuation):
read from the hub or a local copy, they become one row per correction with that spacing
undone, as the notebook makes them. CSVs of ``input,target`` are read as they are."""

import re

from llm_finetune.data.templated import read_split, tokenize_templated

JFLEG_COLUMNS = {"sentence", "corrections"}
# jfleg's "does n't go ." is "doesn't go."
SPACE_BEFORE_PUNCTUATION = re.compile(r" (?=[.,?!:;']|n't\b)")


def detokenize(text: str) -> str:
    return SPACE_BEFORE_PUNCTUATION.sub("", text or "").strip()


def jfleg_pairs(rows):
    """One ``input``/``target`` row per non-empty correction of each sentence."""

    def expand(batch: dict) -> dict:
        pairs = [(detokenize(sentence), detokenize(correction))
                 for sentence, corrections in zip(batch["sentence"], batch["corrections"])
                 for correction in corrections or []]
        pairs = [(source, target) for source, target in pairs if source and target]
        return {"input": [s for s, _ in pairs], "target": [t for _, t in pairs]}

    return rows.map(expand, batched=True, remove_columns=rows.column_names,
                    desc="jfleg: one row per correction")


def load_grammar(config, tokenizer, split: str, max_length: int, bad_rows: str,
                 num_proc: int = 1):
    rows, source = read_split(config, split)
    if JFLEG_COLUMNS <= set(rows.column_names):
        rows, source = jfleg_pairs(rows), None  # rows no longer match file lines
    return tokenize_templated(config, rows, source, tokenizer, split, max_length, bad_rows,
                              num_proc)
