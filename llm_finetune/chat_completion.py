"""Answer the dialogs of a file through the tokenizer's chat template; llama-recipes' chat
completion command lines run unchanged (``python -m llm_finetune.chat_completion`` for their
``chat_completion.py``).

    python -m llm_finetune.chat_completion --model_name meta-llama/Llama-3.1-8B-Instruct \\
        --prompt_file chats.json
    cat chats.json | python -m llm_finetune.chat_completion --model_name BASE --peft_model output

The file (or what is piped in) is llama-recipes' format: a JSON list of dialogs, each a list of
``{"role", "content"}`` messages ending with the user's. Each dialog gets the next assistant
turn. Generation and safety flags are those of ``inference``; a dialog whose prompt is judged
unsafe is skipped, and the command then exits with status 1, as llama-recipes does.
"""

import json
import sys
from pathlib import Path

from llm_finetune.errors import ConfigError
from llm_finetune.inference import Prompt, answer, chat_text, cli, start
from llm_finetune.safety import LLAMA_GUARD

DIALOGS_FORMAT = ('a JSON list of dialogs, each a list of {"role": ..., "content": ...} '
                  'messages ending with the user\'s, e.g. [[{"role": "user", "content": "Hi"}]]')


def read_dialogs(text: str, where: str) -> list[list[dict]]:
    """The dialogs of llama-recipes' chat file (a single dialog is taken as a list of one)."""
    try:
        dialogs = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{where} is not JSON ({error}): expected {DIALOGS_FORMAT}") from None
    if isinstance(dialogs, list) and dialogs and all(isinstance(m, dict) for m in dialogs):
        dialogs = [dialogs]
    if not isinstance(dialogs, list) or not dialogs:
        raise ConfigError(f"{where}: expected {DIALOGS_FORMAT}")
    for number, dialog in enumerate(dialogs, 1):
        if not isinstance(dialog, list) or not dialog or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in dialog):
            raise ConfigError(f"{where}: dialog {number} is not a list of messages with a "
                              f"string role and content; expected {DIALOGS_FORMAT}")
        if dialog[-1]["role"] != "user":
            raise ConfigError(f"{where}: dialog {number} ends with a {dialog[-1]['role']} "
                              "message; the model answers the user's last message, so end each "
                              "dialog with it")
    return dialogs


def dialog_prompt(tokenizer, dialog: list[dict]) -> Prompt:
    """The dialog through the chat template, up to the assistant's turn; the checkers judge
    the dialog, ending with the user's last message, which is what is printed."""
    return Prompt(chat_text(tokenizer, dialog), dialog, dialog[-1]["content"])


def main(model_name: str, peft_model: str = None, quantization: str = None,
         max_new_tokens: int = 256, min_new_tokens: int = 0, prompt_file: str = None,
         seed: int = 42, safety_score_threshold: float = 0.5, do_sample: bool = True,
         use_cache: bool = True, top_p: float = 1.0, temperature: float = 1.0, top_k: int = 50,
         repetition_penalty: float = 1.0, length_penalty: float = 1,
         enable_azure_content_safety: bool = False, enable_sensitive_topics: bool = False,
         enable_saleforce_content_safety: bool = False, use_fast_kernels: bool = False,
         enable_llamaguard_content_safety: bool = False,
         # ours (docs/llama_recipes.md#inference)
         enable_salesforce_content_safety: bool = False,
         llamaguard_model_name: str = LLAMA_GUARD, use_auditnlg: bool = False,
         min_length: int = None, max_padding_length: int = None, num_beams: int = 1,
         batch_size: int = 8, **quantization_flags) -> None:
    """Answer each dialog of ``--prompt_file`` (or of piped input). llama-recipes' flags mean
    what they mean there; docs/llama_recipes.md#inference lists every difference."""
    flags = {k: v for k, v in locals().items() if k != "quantization_flags"}
    # llama-recipes' chat completion spells it "saleforce"; either spelling turns it on
    flags["enable_salesforce_content_safety"] = (enable_salesforce_content_safety
                                                 or enable_saleforce_content_safety)
    if safety_score_threshold != 0.5:
        raise ConfigError("--safety_score_threshold is accepted by llama-recipes' chat "
                          "completion but read by none of its checkers, here neither: each "
                          "checker's own verdict decides. Drop it")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {batch_size}")
    if prompt_file:
        if not Path(prompt_file).is_file():
            raise ConfigError(f"--prompt_file {prompt_file}: no such file")
        dialogs = read_dialogs(Path(prompt_file).read_text(), f"--prompt_file {prompt_file}")
    elif not sys.stdin.isatty():
        dialogs = read_dialogs(sys.stdin.read(), "the piped input")
    else:
        raise ConfigError(f"no dialogs: give --prompt_file chats.json or pipe them in, as "
                          f"{DIALOGS_FORMAT}")
    model, tokenizer, checkers, options = start(flags, quantization_flags, chat=True)
    prompts = [dialog_prompt(tokenizer, dialog) for dialog in dialogs]
    _, refused = answer(model, tokenizer, prompts, options, checkers, batch_size)
    if refused:
        sys.exit(1)


if __name__ == "__main__":
    cli(main)
