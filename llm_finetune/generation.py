"""Generation settings in one place, and the one ``model.generate`` call that inference and chat
completion make.

The settings are llama-recipes' generation flags with their defaults (its ``inference.py``), so
their commands sample the same way here; they are checked before any model loads, and a
setting that cannot act (``--temperature`` with greedy decoding, ``--length_penalty`` without
beam search) is refused instead of silently ignored.
"""

import json
import sys
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from transformers import TextStreamer

from llm_finetune.errors import ConfigError


@dataclass
class GenerationOptions:
    max_new_tokens: int = 100
    min_new_tokens: int = 0  # 0: no minimum
    min_length: typing.Optional[int] = None  # prompt + new tokens (transformers' count)
    do_sample: bool = True  # False: greedy (or beam search with num_beams > 1)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50  # 0: no top-k filtering
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0  # beam search only
    num_beams: int = 1
    use_cache: bool = True
    max_padding_length: typing.Optional[int] = None  # pad (and cut) every prompt to this length

    @classmethod
    def from_flags(cls, flags: dict) -> "GenerationOptions":
        """The options among a command's flags (the other flags are not generation's)."""
        return cls(**{f.name: flags[f.name] for f in fields(cls) if f.name in flags})

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # command lines deliver anything: check before loading
            value, kind = getattr(self, f.name), hints[f.name]
            if typing.get_origin(kind) is typing.Union:  # Optional[X]: None or an X
                if value is None:
                    continue
                kind = typing.get_args(kind)[0]
            if kind is float and type(value) is int:
                setattr(self, f.name, float(value))
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ConfigError(f"--{f.name} expects {kind.__name__}, got {value!r}")
        self._check_ranges()
        self._check_combinations()

    def _check_ranges(self) -> None:
        at_least = {"max_new_tokens": 1, "min_new_tokens": 0, "min_length": 0, "top_k": 0,
                    "num_beams": 1, "max_padding_length": 1}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ConfigError(f"--{name} must be at least {low}, got {value}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top_p is a probability mass in (0, 1], got {self.top_p}")
        for name in ("temperature", "repetition_penalty"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be positive, got {getattr(self, name)}")

    def _check_combinations(self) -> None:
        defaults = GenerationOptions.__dataclass_fields__
        if not self.do_sample:
            shaping = [name for name in ("temperature", "top_p", "top_k")
                       if getattr(self, name) != defaults[name].default]
            if shaping:
                raise ConfigError(
                    f"{', '.join('--' + n for n in shaping)} only act{'s' * (len(shaping) == 1)} "
                    "when sampling, and --do_sample False decodes greedily (llama-recipes "
                    "passes them on and transformers ignores them): drop them, or sample")
        if self.num_beams == 1 and self.length_penalty != defaults["length_penalty"].default:
            raise ConfigError(f"--length_penalty {self.length_penalty} weighs the length of beam "
                              "search hypotheses, and --num_beams is 1 (no beam search; "
                              "llama-recipes passes it on to no effect): add --num_beams N (2 or "
                              "more), or drop it")

    @property
    def can_stream(self) -> bool:
        return self.num_beams == 1  # transformers streams one sequence, not beams

    def generate_kwargs(self) -> dict:
        """What ``model.generate`` gets. The sampling settings are unset when decoding greedily,
        so that sampling values in a model's own generation_config do not apply either."""
        kwargs = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                      num_beams=self.num_beams, repetition_penalty=self.repetition_penalty,
                      use_cache=self.use_cache)
        sampling = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        kwargs.update(sampling if self.do_sample else dict.fromkeys(sampling))
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.min_length is not None:
            kwargs["min_length"] = self.min_length
        return kwargs


def encode(tokenizer, texts: list[str], max_padding_length: typing.Optional[int],
           add_special_tokens: bool = False):
    """Token ids of rendered prompts, left-padded to the longest, or with ``max_padding_length``
    to that length, a longer prompt keeping its first tokens (llama-recipes' truncation), with a
    warning since its end is lost."""
    ids = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    if max_padding_length:
        for number, row in enumerate(ids, 1):
            if len(row) > max_padding_length:
                print(f"warning: prompt {number} has {len(row)} tokens; --max_padding_length "
                      f"{max_padding_length} keeps its first {max_padding_length}",
                      file=sys.stderr, flush=True)
        ids = [row[:max_padding_length] for row in ids]
    return tokenizer.pad({"input_ids": ids}, return_tensors="pt",
                         padding="max_length" if max_padding_length else True,
                         max_length=max_padding_length)


@torch.no_grad()
def generate(model, tokenizer, texts: list[str], options: GenerationOptions,
             stream: bool = False, add_special_tokens: bool = False,
             images: list | None = None) -> list[str]:
    """The answers to rendered prompts (``texts``), generated as one left-padded batch; with
    ``stream`` (one prompt, ``options.can_stream``), also printed as they are generated.
    ``add_special_tokens``: the tokenizer adds its own (BOS) to text that has none.
    ``images``: the images each text is about (one list per text, the text holding an image
    token for each); ``tokenizer`` is then the vision model's processor, which makes the
    model's image inputs (pixels, and for Llama 3.2 Vision the cross-attention mask) as it
    tokenises, left-padded like text."""
    if images is None:
        batch = encode(tokenizer, texts, options.max_padding_length,
                       add_special_tokens).to(model.device)
        text_tokenizer = tokenizer
    else:  # pixels in the model's dtype (bf16 on a GPU)
        batch = tokenizer(text=texts, images=images, add_special_tokens=add_special_tokens,
                          padding=True, return_tensors="pt").to(model.device, dtype=model.dtype)
        text_tokenizer = tokenizer.tokenizer
    streamer = (TextStreamer(text_tokenizer, skip_prompt=True, skip_special_tokens=True)
                if stream else None)
    output = model.generate(**batch, **options.generate_kwargs(), streamer=streamer,
                            pad_token_id=text_tokenizer.pad_token_id)
    new = output[:, batch["input_ids"].shape[1]:]
    return [text_tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def read_prompt_list(prompt_file: str) -> list[str]:
    """A file of prompts (``--prompt_list``, ``--eval_prompts``): a JSON list of prompts, or
    one prompt per line."""
    text = Path(prompt_file).read_text()
    if text.lstrip().startswith("["):
        return [str(p) for p in json.loads(text)]
    return [line for line in text.splitlines() if line.strip()]
