"""``llamaguard_toxicchat_dataset``: fine-tune a Llama Guard style safety classifier on
lmsys/toxic-chat (as llama-recipes' toxicchat recipe does).

Each row becomes a Llama Guard example (``llama_guard``): the ``user_input`` is the prompt
judged; the label is ``safe``, or ``unsafe`` with the category that OpenAI's moderation scores
highest for the row, mapped to Llama Guard 3's codes (none when no score maps to one). The
formatter then writes the prompt (Llama Guard 3's layout and categories unless the data set's
settings say otherwise) and the verdict, the only part with a loss (``guard_rows``)."""

import ast

from llm_finetune.data.guard_rows import tokenize_examples
from llm_finetune.data.llama_guard import GuardExample
from llm_finetune.data.rows import BadRow, require_text
from llm_finetune.data.templated import read_split

# OpenAI moderation categories (toxic-chat's openai_moderation column) -> Llama Guard 3 codes
MODERATION_TO_CODE = {
    "violence": "S1", "violence/graphic": "S1", "sexual/minors": "S4", "hate": "S10",
    "hate/threatening": "S10", "harassment": "S10", "harassment/threatening": "S10",
    "self-harm": "S11", "self-harm/intent": "S11", "self-harm/instructions": "S11",
    "sexual": "S12",
}


def top_code(row: dict) -> str | None:
    """The Llama Guard code of the highest-scored moderation category that has one."""
    scores = row.get("openai_moderation") or "[]"
    try:
        scores = ast.literal_eval(scores) if isinstance(scores, str) else scores
        ranked = sorted(((float(score), name) for name, score in scores), reverse=True)
    except (ValueError, SyntaxError, TypeError) as error:
        raise BadRow(f"field 'openai_moderation' is not a list of [category, score]: "
                     f"{error}") from error
    return next((MODERATION_TO_CODE[name] for _, name in ranked if name in MODERATION_TO_CODE),
                None)


def to_example(row: dict) -> GuardExample:
    prompt = require_text(row, "user_input")
    toxicity = row.get("toxicity")
    if toxicity not in (0, 1, "0", "1"):
        raise BadRow(f"field 'toxicity' is {toxicity!r}, not 0 or 1")
    if int(toxicity) == 0:
        return GuardExample(prompt=prompt, label="safe")
    code = top_code(row)
    return GuardExample(prompt=prompt, label="unsafe",
                        violated_category_codes=[code] if code else [])


def load_toxicchat(config, tokenizer, split: str, max_length: int, bad_rows: str, seed: int,
                   num_proc: int = 1):
    rows, source = read_split(config, split)
    return tokenize_examples(rows, to_example, config, tokenizer, split, max_length, bad_rows,
                             seed, num_proc, where=source.where if source else None)
