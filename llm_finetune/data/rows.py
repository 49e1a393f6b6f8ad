"""Turning raw rows into training samples, with bad rows counted and reported.

A builder gives one function ``row -> sample`` that raises ``BadRow`` with the reason when a row
cannot be used (missing field, wrong type, empty response). ``tokenize_rows`` runs it over the
whole split with ``datasets.map`` (cached: a second run does not re-tokenise) and then, by the
``bad_rows`` policy, fails naming the first offending row, or drops the bad rows and says how many.
Samples longer than ``context_length`` are truncated, and counted.
"""

import datasets


class BadRow(ValueError):
    """This row cannot become a training sample; the message says why."""


class DataError(ValueError):
    """The data set cannot be used as given; the message names the row and the fix."""


def require_text(row: dict, field: str, allow_empty: bool = False) -> str:
    if field not in row or row[field] is None:
        raise BadRow(f"missing field {field!r}")
    value = row[field]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # CSV and JSON numbers ("42") are text answers too
    if not isinstance(value, str):
        raise BadRow(f"field {field!r} is {type(value).__name__}, not text")
    if not allow_empty and not value.strip():
        raise BadRow(f"field {field!r} is empty")
    return value


def tokenize_rows(rows: datasets.Dataset, to_sample, name: str, policy: str,
                  num_proc: int = 1, where=None, empty: dict | None = None) -> datasets.Dataset:
    """Map ``to_sample`` over ``rows`` in ``num_proc`` processes; enforce ``policy`` ("fail" or
    "skip") on bad rows. ``where(position)`` names a row's place in its file (read.RowSource):
    the position is the row's ``_source_row`` when it has one, else its index here. ``empty``:
    what stands for a bad row's sample until it is dropped (the samples' columns, empty)."""
    where = where or (lambda position: f"row {position}")
    empty = empty or {"input_ids": [], "labels": []}

    def convert(row, index):
        position = row.get("_source_row", index)
        try:
            sample = to_sample(row)
        except BadRow as error:
            return {**empty, "truncated": False, "error": str(error), "position": position}
        return {**sample, "error": "", "position": position}

    samples = rows.map(convert, remove_columns=rows.column_names, desc=f"tokenize {name}",
                       with_indices=True, num_proc=num_proc if num_proc > 1 else None,
                       features=sample_features(rows, to_sample))
    errors = [(i, e) for i, e in enumerate(samples["error"]) if e]
    if errors:
        first, reason = errors[0]
        first = where(samples[first]["position"])
        if policy == "fail":
            raise DataError(f"{name}: {len(errors)} of {len(samples)} rows cannot be used; first "
                            f"at {first}: {reason}. Fix the data, or pass --bad_rows skip to "
                            "drop such rows")
        print(f"{name}: skipped {len(errors)} of {len(samples)} rows (first at {first}: "
              f"{reason})", flush=True)
        samples = samples.filter(lambda error: not error, input_columns="error")
    truncated = sum(samples["truncated"])
    if truncated:
        print(f"{name}: {truncated} of {len(samples)} samples truncated to the context length",
              flush=True)
    return samples.remove_columns(["error", "truncated", "position"])


def sample_features(rows: datasets.Dataset, to_sample):
    """The columns' types of the first row that converts: the map writes rows in batches and
    takes its types from the first, where a batch of nothing but bad rows (empty placeholder
    lists) would give types that the good rows after it cannot be cast to. None when no row
    converts (every row is bad: the policy decides)."""
    for row in rows:
        try:
            sample = to_sample(row)
        except BadRow:
            continue
        return datasets.Dataset.from_list([{**sample, "error": "", "position": 0}]).features
    return None


def check_labels(samples, name: str, context_length: int) -> None:
    """A sample without a label token trains nothing (the loss is over label tokens): when
    truncation to ``context_length`` cut off every response, a run would train on nothing and
    report a loss of 0. Refuse that; warn when some samples lost all their labels."""
    empty = 0
    for batch in samples.iter(batch_size=1024):
        # the first token is never a target (each position predicts the next one)
        empty += sum(all(label == -100 for label in labels[1:]) for labels in batch["labels"])
    if empty == len(samples):
        raise DataError(f"{name}: none of the {len(samples)} samples has a token to learn "
                        f"within --context_length {context_length}: truncation cut off every "
                        "response (or every label is -100). Raise --context_length")
    if empty:
        print(f"warning: {name}: {empty} of {len(samples)} samples have no token to learn "
              f"within --context_length {context_length} (responses cut off by truncation) and "
              "train nothing: raise --context_length to keep them", flush=True)


def prompt_response_sample(tokenizer, prompt: str, response: str, max_length: int) -> dict:
    """``<bos> prompt response <eos>`` with the prompt masked out of the loss (label -100)."""
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + prompt_ids
    response_ids = response_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + response_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels,
            "truncated": len(prompt_ids) + len(response_ids) > max_length}


def chat_sample(tokenizer, messages, max_length: int, prompt_messages: int = 0) -> dict:
    """A conversation rendered with the tokenizer's chat template; only assistant turns are
    learned, and none of the first ``prompt_messages`` (a preference pair's prompt). Each
    turn's tokens are the difference between the rendering of the conversation up to that turn
    and up to the previous one, so the template's own markup stays in place."""
    if not isinstance(messages, list) or not messages:
        raise BadRow("'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise BadRow(f"message {i} needs 'role' and 'content'")
        if not isinstance(message["content"], str):
            raise BadRow(f"message {i} content is {type(message['content']).__name__}, not text")
    if not any(m["role"] == "assistant" and m["content"].strip()
               for m in messages[prompt_messages:]):
        raise BadRow("no non-empty assistant message to learn from")
    input_ids, labels, _ = turn_tokens(tokenizer, messages, tokenizer.apply_chat_template,
                                       prompt_messages)
    return {"input_ids": input_ids[:max_length], "labels": labels[:max_length],
            "truncated": len(input_ids) > max_length}


def turn_tokens(tokenizer, messages, render, prompt_messages: int = 0):
    """(input ids, labels, text) of a conversation rendered by ``render(messages,
    tokenize=False)`` (a chat template). Each turn's tokens are the difference between the
    rendering of the conversation up to that turn and up to the previous one, so the template's
    own markup stays in place; only assistant turns after the first ``prompt_messages`` are
    labelled."""
    input_ids, labels, done = [], [], ""
    for i, message in enumerate(messages):
        text = render(messages[: i + 1], tokenize=False)
        if not text.startswith(done):
            raise BadRow("the chat template renders a conversation differently from its "
                         "prefix; it cannot be split into turns")
        ids = tokenizer.encode(text[len(done):], add_special_tokens=False)
        input_ids += ids
        learned = message["role"] == "assistant" and i >= prompt_messages
        labels += ids if learned else [-100] * len(ids)
        done = text
    return input_ids, labels, done
