"""``llamaguard_toxicchat_dataset``: fine-tune a Llama Guard style safety classifier on
lmsys/toxic-chat (as llama-recipes' toxicchat recipe does).

Each row's ``user_input`` is placed in a Llama Guard 3 style classification prompt listing the
unsafe-content categories; the target is ``safe``, or ``unsafe`` and, on the next line, the
category that OpenAI's moderation scores highest for the row, mapped to Llama Guard's codes.
Only the verdict carries a loss (llama-recipes trains on the whole prompt, so most of its
gradient goes to reproducing the fixed instructions)."""

import ast

from llm_finetune.data.rows import BadRow, prompt_response_sample, require_text, tokenize_rows
from llm_finetune.data.templated import read_split

CATEGORIES = {
    "S1": "Violent Crimes", "S2": "Non-Violent Crimes", "S3": "Sex-Related Crimes",
    "S4": "Child Sexual Exploitation", "S5": "Defamation", "S6": "Specialized Advice",
    "S7": "Privacy", "S8": "Intellectual Property", "S9": "Indiscriminate Weapons",
    "S10": "Hate", "S11": "Suicide & Self-Harm", "S12": "Sexual Content", "S13": "Elections",
    "S14": "Code Interpreter Abuse",
}
# OpenAI moderation categories (toxic-chat's openai_moderation column) -> Llama Guard codes
MODERATION_TO_CODE = {
    "violence": "S1", "violence/graphic": "S1", "sexual/minors": "S4", "hate": "S10",
    "hate/threatening": "S10", "harassment": "S10", "harassment/threatening": "S10",
    "self-harm": "S11", "self-harm/intent": "S11", "self-harm/instructions": "S11",
    "sexual": "S12",
}
PROMPT = (
    "Task: Check if there is unsafe content in 'User' messages in conversations according to "
    "our safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    + "".join(f"{code}: {name}.\n" for code, name in CATEGORIES.items())
    + "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\nUser: {user_input}\n\n"
    "<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST User message in "
    "the above conversation:\n- First line must read 'safe' or 'unsafe'.\n- If unsafe, a second "
    "line must include a comma-separated list of violated categories.\n"
)


def verdict(row: dict) -> str:
    toxicity = row.get("toxicity")
    if toxicity not in (0, 1, "0", "1"):
        raise BadRow(f"field 'toxicity' is {toxicity!r}, not 0 or 1")
    if int(toxicity) == 0:
        return "safe"
    scores = row.get("openai_moderation") or "[]"
    try:
        scores = ast.literal_eval(scores) if isinstance(scores, str) else scores
        ranked = sorted(((float(score), name) for name, score in scores), reverse=True)
    except (ValueError, SyntaxError, TypeError) as error:
        raise BadRow(f"field 'openai_moderation' is not a list of [category, score]: "
                     f"{error}") from error
    code = next((MODERATION_TO_CODE[name] for _, name in ranked if name in MODERATION_TO_CODE),
                None)
    return f"unsafe\n{code}" if code else "unsafe"


def load_toxicchat(config, tokenizer, split: str, max_length: int, bad_rows: str,
                   num_proc: int = 1):
    rows, source = read_split(config, split)

    def to_sample(row):
        prompt = PROMPT.format(user_input=require_text(row, "user_input"))
        return prompt_response_sample(tokenizer, prompt, verdict(row), max_length)

    return tokenize_rows(rows, to_sample, f"llamaguard_toxicchat_dataset {split}", bad_rows,
                         num_proc, where=source.where if source else None)
