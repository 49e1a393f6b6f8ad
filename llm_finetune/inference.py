"""Generate from a model or a fine-tuning result; llama-recipes' inference command lines run
unchanged (``python -m llm_finetune.inference`` for their ``inference.py``).

    python -m llm_finetune.inference --model_name output/model --prompt_file prompt.txt
    cat prompt.txt | python -m llm_finetune.inference --model_name BASE --peft_model output
    python -m llm_finetune.inference --model_name output/model --prompt "What is 2 + 3?"
    python -m llm_finetune.inference --model_name BASE --peft_model output \\
        --prompt_file questions.txt --prompt_list
    python -m llm_finetune.inference --model_name output/model          # interactive

What the model reads: a prompt file, or what is piped in, is one prompt, as written (llama-
recipes' meaning: such a file carries its own format, like their samsum_prompt.txt). An
instruction (``--prompt``, each entry of a ``--prompt_list`` file: one per line or a JSON list,
each line typed interactively) is wrapped in the Alpaca format that ``alpaca_dataset`` and
``file_dataset`` train on. ``--chat`` renders either as a user turn of the tokenizer's chat
template. Generation flags: ``generation.py``; safety checkers: ``safety.py``.

With ``--image_path`` (a vision model: Llama 3.2 Vision, or a base and its ``--peft_model``),
every prompt, whichever way it comes, is asked about that image as llama-recipes'
multi_modal_infer.py asks: a user turn of an image and the prompt's text, rendered with the
processor's chat template, the processor making the image inputs (docs/vision.md). Several
images, comma-separated, are several image parts of that turn, in their order.

    python -m llm_finetune.inference --model_name output/model --image_path cat.png \\
        --prompt "What is in this picture?" --do_sample False
    python -m llm_finetune.inference --model_name output/model --image_path a.png,b.png \\
        --prompt "Which of the two is larger?"
"""

import dataclasses
import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

import fire
import torch
from PIL import Image
from transformers import AutoTokenizer

from llm_finetune.config_utils import (check_choices, default_run_config, llama_recipes_value,
                                       update_run_config)
from llm_finetune.configs import quantization_config
from llm_finetune.data.alpaca import format_prompt
from llm_finetune.errors import ConfigError
from llm_finetune.generation import (GenerationOptions, generate as generate_rendered,
                                     read_prompt_list)
from llm_finetune.model import (attention_implementation, fit_embeddings_to_tokenizer,
                                from_pretrained, is_vision_model, load_base_model,
                                vision_processor)
from llm_finetune.quantization import bits_and_bytes, bitsandbytes_problem
from llm_finetune.safety import LLAMA_GUARD, build_checkers, screen_answer, screen_prompt


NO_CHAT_TEMPLATE = ("the tokenizer has no chat template to render the conversation with (a "
                    "base model's tokenizer often has none): use a chat model, or an adapter "
                    "whose directory holds a tokenizer with one")


@dataclass
class Prompt:
    text: str  # what the model reads
    conversation: list  # what the safety checkers judge: messages ending with the user's
    shown: str  # how it is printed
    add_special_tokens: bool = False  # text as written: the tokenizer adds its BOS
    images: list | None = None  # the images the prompt asks about (a vision model's)


def load(model_name: str, peft_model: str = "", quantization: str = "",
         use_fast_kernels: bool = False, settings: quantization_config = None,
         chat: bool = False, device: str = "", processor: bool = False):
    """The model in eval mode (bf16 on a GPU, spread over the GPUs as llama-recipes' device map
    does; fp32 on the CPU) and its tokenizer, left-padding batches. A ``--quantization`` that
    cannot run here, or with ``chat`` a tokenizer without a chat template, is refused before
    any weights load. ``device``: where to put it (empty: a GPU when there is one).
    ``processor``: a vision model's processor (tokenizer, image processor and chat template)
    instead of the tokenizer, from the adapter's directory when a run saved it there."""
    cuda = torch.cuda.is_available() if not device else device.startswith("cuda")
    device = device or ("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    problem = quantization and bitsandbytes_problem(quantization, device)
    if problem:
        raise ConfigError(problem)
    if processor:
        tokenizer = load_processor(model_name, peft_model)
    else:
        tokenizer = load_tokenizer(model_name, peft_model)
        if chat and tokenizer.chat_template is None:
            raise ConfigError(NO_CHAT_TEMPLATE)
    # without --use_fast_kernels, transformers' own choice, as in llama-recipes
    kwargs = {"attn_implementation": attention_implementation(True)} if use_fast_kernels else {}
    quantized = bits_and_bytes(quantization, settings or quantization_config())
    if quantized is not None:
        kwargs["quantization_config"] = quantized
    if cuda or quantized is not None:
        kwargs["device_map"] = "auto" if device == "cuda" else {"": device}
    model = load_base_model(model_name, dtype, peft_model or "", **kwargs)
    if not getattr(model, "hf_device_map", None):  # a config-only base, built on the CPU
        model = model.to(device)
    if peft_model:
        from peft import PeftModel

        # a run with added tokens grew the embedding, which its adapter then holds
        fit_embeddings_to_tokenizer(model, getattr(tokenizer, "tokenizer", tokenizer),
                                    verbose=False)
        model = PeftModel.from_pretrained(model, peft_model)
    return model.eval(), tokenizer


def load_tokenizer(model_name: str, peft_model: str):
    """The tokenizer, left-padding: the adapter's when its run saved one (added tokens)."""
    adapter_tokenizer = peft_model and (Path(peft_model) / "tokenizer_config.json").is_file()
    tokenizer = from_pretrained(AutoTokenizer, peft_model if adapter_tokenizer else model_name,
                                "peft_model" if adapter_tokenizer else "model_name",
                                padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_processor(model_name: str, peft_model: str):
    """A vision model's processor, its tokenizer left-padding; the adapter's when its run saved
    one there (a vision run saves its processor beside the adapter)."""
    saved = peft_model and any((Path(peft_model) / name).is_file()
                               for name in ("processor_config.json", "preprocessor_config.json"))
    processor = vision_processor(peft_model if saved else model_name,
                                 "peft_model" if saved else "model_name", padding_side="left")
    if getattr(processor, "chat_template", None) is None:
        raise ConfigError("--image_path asks about the image in a user turn of the processor's "
                          "chat template, and this processor has none: use a model (or an "
                          "adapter directory) whose processor has one")
    return processor


def image_paths(image_path) -> list[str]:
    """``--image_path``: one path or several, comma-separated (fire hands ``a,b`` over as a
    tuple; Python callers may give a list)."""
    given = image_path.split(",") if isinstance(image_path, str) else map(str, image_path)
    return [path.strip() for path in given if path.strip()]


def read_image(image_path: str) -> Image.Image:
    """One ``--image_path`` as an RGB image, or one line saying why it cannot be read."""
    path = Path(image_path)
    if not path.is_file():
        raise ConfigError(f"--image_path {image_path}: no such file")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:  # PIL raises several kinds for a file that is not an image
        raise ConfigError(f"--image_path {image_path} cannot be read as an image "
                          f"({type(error).__name__}: {error})") from None


def check_image_model(model_name: str) -> None:
    """``--image_path`` needs a vision model (read from its config, before any weights)."""
    if not is_vision_model(model_name):
        raise ConfigError(f"--image_path gives the model an image, and --model_name {model_name} "
                          "is a text-only causal LM (its config has no vision_config): use a "
                          "vision model (Llama 3.2 Vision: docs/vision.md), or drop --image_path")


def quantization_settings(extra: dict, known: list[str]) -> quantization_config:
    """llama-recipes hands the flags its inference does not name to its quantization config:
    ``--quant_type nf4`` or ``--quantization_config.quant_type nf4``. Any other flag is a typo,
    refused with the nearest names (theirs ignores it)."""
    names = {f.name for f in dataclasses.fields(quantization_config)}
    settings, unknown = {}, []
    for key, value in extra.items():
        name = key.replace("-", "_").removeprefix("quantization_config.")
        if name in names:
            settings[f"quantization_config.{name}"] = value
        else:
            unknown.append(key)
    if unknown:
        valid = known + [f"quantization_config.{name}" for name in sorted(names)]
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join('--' + c for c in close)}?" if close else ""
            lines.append(f"unknown flag --{key}.{hint}")
        raise ConfigError("\n".join(lines) + "\nSee --help, or docs/llama_recipes.md#inference.")
    run = default_run_config()
    update_run_config(run, settings)
    check_choices(run)
    return run.quantization


def start(flags: dict, extra: dict, chat: bool):
    """What inference and chat completion do before their first prompt, cheapest checks first:
    generation options, quantization, safety checkers (each says what it lacks), the seed, then
    the model. ``flags`` are the command's named flags, ``extra`` the others; ``chat``: the
    prompts go through the tokenizer's chat template."""
    options = GenerationOptions.from_flags(flags)
    kind = llama_recipes_value("train_config.quantization", flags["quantization"]) or ""
    if kind not in ("", "4bit", "8bit"):
        raise ConfigError(f"--quantization {kind!r} is not one of: 4bit, 8bit")
    settings = quantization_settings(extra, known=list(flags))
    problem = kind and bitsandbytes_problem(kind, "cuda" if torch.cuda.is_available() else "cpu")
    if problem:
        raise ConfigError(problem)
    checkers = build_checkers(
        azure=flags["enable_azure_content_safety"],
        sensitive_topics=flags["enable_sensitive_topics"] or flags["use_auditnlg"],
        salesforce=flags["enable_salesforce_content_safety"],
        llamaguard=flags["enable_llamaguard_content_safety"],
        llamaguard_model_name=flags["llamaguard_model_name"])
    torch.manual_seed(flags["seed"])
    model, tokenizer = load(flags["model_name"], flags["peft_model"] or "", kind,
                            flags["use_fast_kernels"], settings, chat,
                            processor=bool(flags.get("image_path")))
    return model, tokenizer, checkers, options


def answer(model, tokenizer, prompts: list[Prompt], options: GenerationOptions, checkers=(),
           batch_size: int = 8, stream: bool = False) -> tuple[list, int]:
    """Generate for ``prompts`` in batches and print the answers; with safety checkers, a
    prompt judged unsafe is skipped and an answer judged unsafe reported instead of shown.
    Returns the answers (None where skipped or withheld) and how many prompts were refused.
    ``stream``: print a lone prompt's answer as it is generated (not with checkers, which must
    judge it first)."""
    answers, refused = [None] * len(prompts), 0
    stream = stream and len(prompts) == 1 and not checkers and options.can_stream
    for start in range(0, len(prompts), batch_size):
        chunk = list(enumerate(prompts))[start:start + batch_size]
        passed = [(i, p) for i, p in chunk if screen_prompt(checkers, p.conversation, p.shown)]
        refused += len(chunk) - len(passed)
        if not passed:
            continue
        texts = [p.text for _, p in passed]
        special = passed[0][1].add_special_tokens
        images = [p.images for _, p in passed] if passed[0][1].images else None
        for (i, p), text in zip(passed, generate_rendered(model, tokenizer, texts, options,
                                                           stream, add_special_tokens=special,
                                                           images=images)):
            if not checkers:
                answers[i] = text
                if not stream:
                    print(f"### {p.shown}\n{text}\n", flush=True)
            elif screen_answer(checkers, p.conversation, text):
                answers[i] = text
    return answers, refused


def generate(model, tokenizer, prompts: list[str], chat: bool = False, stream: bool = False,
             **settings) -> list[str]:
    """From Python: the answers to instructions (Alpaca-wrapped, or with ``chat`` user turns of
    the chat template); ``settings`` are ``GenerationOptions``' (llama-recipes' defaults)."""
    texts = [instruction(tokenizer, p, chat).text for p in prompts]
    return generate_rendered(model, tokenizer, texts, GenerationOptions(**settings), stream)


def instruction(tokenizer, text: str, chat: bool) -> Prompt:
    """An instruction: Alpaca-wrapped, or with ``chat`` a user turn of the chat template."""
    conversation = [{"role": "user", "content": text}]
    if chat:
        return Prompt(chat_text(tokenizer, conversation), conversation, text)
    return Prompt((tokenizer.bos_token or "") + format_prompt(text, ""), conversation, text)


def as_written(tokenizer, text: str, chat: bool) -> Prompt:
    """A prompt file or piped input: the text as written (the tokenizer adds its BOS, as in
    llama-recipes), or with ``chat`` a user turn of the chat template."""
    conversation = [{"role": "user", "content": text}]
    if chat:
        return Prompt(chat_text(tokenizer, conversation), conversation, text)
    return Prompt(text, conversation, text, add_special_tokens=True)


def about_images(processor, text: str, images: list) -> Prompt:
    """A prompt about images, as llama-recipes' multi_modal_infer.py asks about one: a user turn
    of an image part per image, then the text, rendered with the processor's chat template.
    The safety checkers judge the text."""
    parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
    turn = [{"role": "user", "content": parts}]
    rendered = processor.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return Prompt(rendered, [{"role": "user", "content": text}], text, images=images)


def chat_text(tokenizer, conversation: list[dict]) -> str:
    if tokenizer.chat_template is None:
        raise ConfigError(NO_CHAT_TEMPLATE)
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


def main(model_name: str, peft_model: str = None, quantization: str = None,
         max_new_tokens: int = 100, prompt_file: str = None, seed: int = 42,
         do_sample: bool = True, min_length: int = None, use_cache: bool = True,
         top_p: float = 1.0, temperature: float = 1.0, top_k: int = 50,
         repetition_penalty: float = 1.0, length_penalty: float = 1,
         enable_azure_content_safety: bool = False, enable_sensitive_topics: bool = False,
         enable_salesforce_content_safety: bool = False,
         enable_llamaguard_content_safety: bool = False, max_padding_length: int = None,
         use_fast_kernels: bool = False, share_gradio: bool = False,
         # ours (docs/llama_recipes.md#inference)
         llamaguard_model_name: str = LLAMA_GUARD, use_auditnlg: bool = False, prompt: str = "",
         prompt_list: bool = False, chat: bool = False, batch_size: int = 8,
         min_new_tokens: int = 0, num_beams: int = 1, image_path: str = "",
         **quantization_flags) -> None:
    """Answer a prompt file (one prompt, as written), ``--prompt`` or a ``--prompt_list``
    (instructions), piped input (one prompt), or lines typed at the terminal. llama-recipes'
    flags mean what they mean there; docs/llama_recipes.md#inference lists every difference.
    ``image_path``: each prompt is asked about this image, or these comma-separated images
    (a vision model's; module doc)."""
    flags = {k: v for k, v in locals().items() if k != "quantization_flags"}
    if share_gradio:
        raise ConfigError("--share_gradio shares llama-recipes' gradio web page, which is not "
                          "part of this tool: without --prompt_file or piped input it asks for "
                          "prompts in the terminal instead. Drop --share_gradio")
    if prompt and prompt_file:
        raise ConfigError("--prompt and --prompt_file are two sources of prompts: give one")
    if prompt_list and not prompt_file:
        raise ConfigError("--prompt_list says how to read --prompt_file: give the file")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {batch_size}")
    if prompt_file and not Path(prompt_file).is_file():
        raise ConfigError(f"--prompt_file {prompt_file}: no such file")
    images = None
    if image_path:
        if max_padding_length:
            raise ConfigError("--max_padding_length pads and cuts text prompts; with "
                              "--image_path the processor tokenises each prompt whole (a cut "
                              "could drop its image token): drop --max_padding_length")
        paths = image_paths(image_path)
        if not paths:
            raise ConfigError(f"--image_path {image_path!r} names no image: give a path, or "
                              "several comma-separated")
        images = [read_image(path) for path in paths]
        check_image_model(model_name)
    piped = None
    if not (prompt or prompt_file) and not sys.stdin.isatty():  # one prompt, as llama-recipes
        piped = sys.stdin.read()
        if not piped.strip():
            raise ConfigError("nothing was piped in: give --prompt_file, --prompt, or a prompt "
                              "on standard input")
    model, tokenizer, checkers, options = start(flags, quantization_flags, chat)

    def run(prompts: list[Prompt]) -> None:
        answer(model, tokenizer, prompts, options, checkers, batch_size, stream=True)

    # with images every prompt is a user turn about them; else instructions, or text as written
    ask = ((lambda text: about_images(tokenizer, text, images)) if images
           else (lambda text: instruction(tokenizer, text, chat)))
    if prompt:
        run([ask(prompt)])
    elif prompt_list:
        run([ask(p) for p in read_prompt_list(prompt_file)])
    elif prompt_file or piped is not None:
        text = Path(prompt_file).read_text() if prompt_file else piped
        run([about_images(tokenizer, text, images) if images
             else as_written(tokenizer, text, chat)])
    else:
        print("prompt (empty line or Ctrl-D to quit):", flush=True)
        for line in sys.stdin:
            if not line.strip():
                break
            run([ask(line.strip())])


def cli(command) -> None:
    """Run ``command`` with fire; a refused setting is one line and exit status 2."""
    try:
        fire.Fire(command)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli(main)
