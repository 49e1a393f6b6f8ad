"""Sample answers at each evaluation (``--eval_prompts``): a few prompts answered greedily by
the model being trained, written to metrics.jsonl (and as text to the trackers), so a run's
answers can be read as it learns, beside its eval loss.

The prompts are used as written (the format the training data uses: an Alpaca prompt, a chat
template's text). Decoding is a plain greedy loop over the model's own forward with no KV
cache: every rank runs it in step, which a sharded FSDP forward needs, the same on one
process, DDP and FSDP, and a few short answers cost little."""

from pathlib import Path

import torch

from llm_finetune.errors import ConfigError
from llm_finetune.generation import read_prompt_list


class SampleAnswers:
    def __init__(self, tokenizer, prompts_file: str, max_new_tokens: int, device):
        self.tokenizer = tokenizer
        self.prompts = read_prompt_list(prompts_file)
        self.max_new_tokens = max_new_tokens
        self.device = device

    @torch.no_grad()
    def answer(self, model, prompt: str) -> str:
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.device)
        start = ids.shape[1]
        for _ in range(self.max_new_tokens):
            logits = model(input_ids=ids).logits[:, -1]
            next_id = logits.argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
            if next_id.item() == self.tokenizer.eos_token_id:
                break
        return self.tokenizer.decode(ids[0, start:], skip_special_tokens=True)

    def __call__(self, model, step: int) -> dict:
        """The metrics record of this evaluation's answers (model in eval mode: no dropout)."""
        return {"step": step, "samples": [{"prompt": prompt, "answer": self.answer(model, prompt)}
                                          for prompt in self.prompts]}


def check_sample_settings(t) -> None:
    if not t.eval_prompts:
        return
    if not Path(t.eval_prompts).is_file():
        raise ConfigError(f"--eval_prompts {t.eval_prompts}: no such file (a JSON list of "
                          "prompts, or one prompt per line)")
    if not t.run_validation:
        raise ConfigError("--eval_prompts are answered at each evaluation, and --run_validation "
                          "is off: turn it on, or drop --eval_prompts")
    if t.eval_max_new_tokens < 1:
        raise ConfigError(f"--eval_max_new_tokens must be at least 1, got {t.eval_max_new_tokens}")
