"""Generate from a fine-tuned model, with the prompt format it was trained with.

    python -m llm_finetune.inference --model_name output/model --prompt "What is 2 + 3?"
    python -m llm_finetune.inference --model_name BASE --peft_model output --prompt_file prompts.txt
    python -m llm_finetune.inference --model_name output/model          # interactive

Prompts are instructions, wrapped in the Alpaca format that ``alpaca_dataset`` and instruction
rows of ``file_dataset`` train on, or with ``--chat`` rendered as a user turn through the
tokenizer's chat template. A prompt file holds one prompt per line (or a JSON list). Prompts
are generated in batches (left-padded); a single prompt streams to the terminal.
"""

import json
import sys
from pathlib import Path

import fire
import torch
from transformers import AutoTokenizer, TextStreamer

from llm_finetune.errors import ConfigError
from llm_finetune.data.alpaca import format_prompt
from llm_finetune.model import fit_embeddings_to_tokenizer, load_base_model, resolve_model_path


def load(model_name: str, peft_model: str = "", device: str = ""):
    """The model (with its adapter, if given) in eval mode, and its tokenizer. ``device``: where
    to put it (empty: a GPU when there is one); bf16 on a GPU, fp32 on the CPU."""
    path = resolve_model_path(model_name)
    tokenizer_dir = peft_model if peft_model and (Path(peft_model) / "tokenizer_config.json").is_file() else path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_base_model(model_name, dtype, peft_model)
    if peft_model:
        from peft import PeftModel

        # a run with added tokens grew the embedding, which its adapter then holds
        fit_embeddings_to_tokenizer(model, tokenizer, verbose=False)
        model = PeftModel.from_pretrained(model, peft_model)
    return model.to(device).eval(), tokenizer


def render(tokenizer, prompt: str, chat: bool) -> str:
    if chat:
        if tokenizer.chat_template is None:
            raise SystemExit("--chat needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    return (tokenizer.bos_token or "") + format_prompt(prompt, "")


def read_prompts(prompt_file: str) -> list[str]:
    text = Path(prompt_file).read_text()
    if text.lstrip().startswith("["):
        return [str(p) for p in json.loads(text)]
    return [line for line in text.splitlines() if line.strip()]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], chat: bool = False, max_new_tokens: int = 128,
             do_sample: bool = False, temperature: float = 1.0, stream: bool = False) -> list[str]:
    texts = [render(tokenizer, p, chat) for p in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding=True,
                      add_special_tokens=False).to(model.device)
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                            temperature=temperature if do_sample else None,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            streamer=TextStreamer(tokenizer, skip_prompt=True,
                                                  skip_special_tokens=True) if stream else None)
    new = output[:, batch["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def main(model_name: str, peft_model: str = "", prompt: str = "", prompt_file: str = "",
         chat: bool = False, max_new_tokens: int = 128, batch_size: int = 8,
         do_sample: bool = False, temperature: float = 1.0) -> None:
    model, tokenizer = load(model_name, peft_model)
    options = dict(chat=chat, max_new_tokens=max_new_tokens, do_sample=do_sample,
                   temperature=temperature)
    if prompt:
        generate(model, tokenizer, [prompt], stream=True, **options)
    elif prompt_file:
        prompts = read_prompts(prompt_file)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            for text, answer in zip(chunk, generate(model, tokenizer, chunk, **options)):
                print(f"### {text}\n{answer}\n", flush=True)
    else:  # interactive
        print("prompt (empty line or Ctrl-D to quit):", flush=True)
        for line in sys.stdin:
            if not line.strip():
                break
            generate(model, tokenizer, [line.strip()], stream=True, **options)


if __name__ == "__main__":
    try:
        fire.Fire(main)
    except ConfigError as error:  # a model that is not there: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
