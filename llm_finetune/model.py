"""Load the tokenizer and the model: from the hub, a local directory, or a built-in config.

With ``low_cpu_fsdp`` only rank 0 reads weights into CPU memory; the other ranks build the same
architecture on the ``meta`` device (no memory at all) and receive their shards from rank 0 when
FSDP wraps the model: ``engine.RankZeroInit`` broadcasts rank 0's values unit by unit. A
directory that holds only ``config.json`` (or a built-in name) gives a randomly initialised
model, seeded so every rank builds the same one.
"""

import importlib.util
import json
import os
from pathlib import Path

import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoProcessor, AutoTokenizer)
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from llm_finetune.adapters import base_model_of
from llm_finetune.attention import PACKED_ATTENTION, varlen_available
from llm_finetune.attention import supports as supports_packed
from llm_finetune.attention import register as register_packed_attention
from llm_finetune.errors import ConfigError
from llm_finetune.quantization import to_4bit_layers
from llm_finetune.random_init import SeededInit
from llm_finetune.shapes import SHAPES
from llm_finetune.vision import check_vision_model, in_vision_parts, is_vision_config

ASSETS = Path(__file__).resolve().parent / "assets"
BUILTIN_MODELS = {"tiny-llama": ASSETS / "tiny-llama", "tiny-mllama": ASSETS / "tiny-mllama"}
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
# in an adapter directory trained on a config-only base: how to rebuild that base's weights
RANDOM_BASE_FILE = "random_init_base.json"


def resolve_model_path(name: str) -> str:
    return str(BUILTIN_MODELS.get(name, name))


def from_pretrained(loader, name: str, setting: str = "model_name", **kwargs):
    """``loader.from_pretrained`` of a hub name, directory or built-in name; a name that is none
    of these (a typo, a directory that is not there, no network) is one ``ConfigError`` line
    instead of a page of connection traceback."""
    try:
        return loader.from_pretrained(resolve_model_path(name), **kwargs)
    except OSError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        shapes = (f", a built-in shape to initialise randomly ({', '.join(SHAPES)})"
                  if setting == "model_name" else "")
        raise ConfigError(
            f"--{setting} {name} is neither a local directory nor a model on the Hugging Face "
            f"hub that could be reached ({reason}). Give a directory with config.json, a "
            f"built-in name ({', '.join(BUILTIN_MODELS)}){shapes}, or a hub name as spelt on "
            "huggingface.co (gated models need `hf auth login`; offline, it must be in the "
            "cache)") from None


def has_weights(path: str) -> bool:
    """False for a local directory with a config but no weight files; hub names have weights."""
    directory = Path(path)
    if not directory.is_dir():
        return True
    return any(any(directory.glob(pattern)) for pattern in WEIGHT_FILES)


def is_vision_model(model_name: str, local_only: bool = False) -> bool | None:
    """Whether ``model_name`` is a vision-language model (read from its config; with
    ``local_only``, None for a hub name rather than reach the hub: preflight's question, which
    the run asks again once it has read the config)."""
    hub_name = model_name not in SHAPES and not Path(resolve_model_path(model_name)).is_dir()
    if local_only and hub_name:
        return None
    return is_vision_config(model_config(model_name))


def auto_class(config):
    """transformers' loader for this config: image-text-to-text for vision-language models."""
    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


def load_processor(train_cfg):
    """A vision model's processor (its tokenizer, image processor and chat template), padding
    on the right as training needs; its tokenizer is ``processor.tokenizer``."""
    name = train_cfg.tokenizer_name or train_cfg.model_name
    if name in SHAPES:
        raise ConfigError(f"{name} is a built-in shape without a processor: add "
                          "--tokenizer_name, a directory or hub name of the model's processor "
                          "(Llama 3.2 Vision's: meta-llama/Llama-3.2-11B-Vision-Instruct)")
    setting = "tokenizer_name" if train_cfg.tokenizer_name else "model_name"
    return vision_processor(name, setting, padding_side="right")


def processor_class_name(name: str) -> str | None:
    """The processor class ``AutoProcessor`` builds for ``name``: the one its
    processor_config.json names, else its model type's; None when neither can be read."""
    saved = Path(resolve_model_path(name)) / "processor_config.json"
    if saved.is_file():
        return json.loads(saved.read_text()).get("processor_class")
    try:
        return PROCESSOR_MAPPING_NAMES.get(model_config(name).model_type)
    except ConfigError:
        return None


def check_processor_backend(name: str, setting: str) -> None:
    """Processors that take videos too (Qwen2-VL's) are built by transformers with a video
    processor, which needs torchvision even for images: without it ``AutoProcessor`` fails
    with a message about a missing video_preprocessor_config.json. Say what is missing."""
    cls = getattr(transformers, processor_class_name(name) or "", None)
    if is_torchvision_available() or cls is None or not hasattr(cls, "get_attributes"):
        return
    if "video_processor" in cls.get_attributes():
        raise ConfigError(f"--{setting} {name}: {cls.__name__} has a video processor, which "
                          "transformers builds with torchvision even for images, and torchvision "
                          "is not installed: install the torchvision build that matches torch "
                          f"{torch.__version__} (pip install torchvision)")


def vision_processor(name: str, setting: str, padding_side: str):
    """The processor at ``name`` (given as ``--setting``), checked to have a tokenizer and an
    image processor, its tokenizer padding on ``padding_side`` with a pad token."""
    check_processor_backend(name, setting)
    processor = from_pretrained(AutoProcessor, name, setting)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or getattr(processor, "image_processor", None) is None:
        raise ConfigError(f"--{setting} {name}: a vision model needs a processor with a "
                          "tokenizer and an image processor (processor_config.json or "
                          "preprocessor_config.json beside the tokenizer)")
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_tokenizer(train_cfg):
    name = train_cfg.tokenizer_name or train_cfg.model_name
    if name in SHAPES:
        raise ValueError(f"{name} is a built-in shape without a tokenizer: add --tokenizer_name "
                         "(a hub name, a directory, or tiny-llama for token ids below 1024)")
    setting = "tokenizer_name" if train_cfg.tokenizer_name else "model_name"
    tokenizer = from_pretrained(AutoTokenizer, name, setting)
    if tokenizer.pad_token_id is None:  # Llama tokenizers ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def attention_implementation(use_fast_kernels: bool, packing: bool = False,
                             config=None) -> str:
    """With ``use_fast_kernels`` on a GPU: flash-attention 2 when installed; else, for packed
    batches, PyTorch's own flash-attention varlen kernel (``attention.PACKED_ATTENTION``: the
    samples kept apart by where they start) where it computes the model's attention
    (``config``; ``attention.supports``), else flex attention (the samples-apart mask as a
    sparse kernel). Both keep samples apart without SDPA's dense mask, which rules out its
    flash kernel; the varlen kernel starts at once where flex first compiles its kernel
    (docs/performance.md). Otherwise PyTorch SDPA, which picks its own flash /
    memory-efficient kernels."""
    if use_fast_kernels and torch.cuda.is_available():
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        if packing and varlen_available() and (config is None or supports_packed(config)):
            register_packed_attention()
            return PACKED_ATTENTION
        if packing:
            return "flex_attention"
    return "sdpa"


def model_config(model_name: str):
    """The config of a built-in shape, a local directory or a hub model (no weights read)."""
    if model_name in SHAPES:
        return SHAPES[model_name]()
    return from_pretrained(AutoConfig, model_name)


def meta_model(config, dtype: torch.dtype, attn: str) -> torch.nn.Module:
    """The architecture on the meta device: no memory, no initialisation."""
    with torch.device("meta"):
        return auto_class(config).from_config(config, dtype=dtype, attn_implementation=attn)


def random_init(model: torch.nn.Module, seed: int, device) -> torch.nn.Module:
    """Materialise a model built on the meta device directly on ``device`` with seeded random
    values (``SeededInit``): the same weights FSDP ranks build unit by unit (a GPU initialises
    an 8B model in seconds; on a CPU use this rank's share of the cores, since torchrun gives
    each rank one thread)."""
    threads = torch.get_num_threads()
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(max(threads, len(os.sched_getaffinity(0)) // ranks_here))
    try:
        SeededInit(model, seed, device)(model)
    finally:
        torch.set_num_threads(threads)
    return model


def weights_on_disk(train_cfg) -> bool:
    return name_has_weights(train_cfg.model_name)


def name_has_weights(model_name: str) -> bool:
    return model_name not in SHAPES and has_weights(resolve_model_path(model_name))


def record_random_base(adapter_dir, train_cfg, dtype: torch.dtype) -> None:
    """Beside an adapter trained on a config-only base (``tiny-llama``, a directory with only
    config.json), note the seed and dtype its base was initialised with: the base has no weights
    to load, and ``load_base_model`` rebuilds exactly those random weights from this."""
    record = {"model_name": train_cfg.model_name, "seed": train_cfg.seed,
              "dtype": str(dtype).removeprefix("torch.")}
    (Path(adapter_dir) / RANDOM_BASE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_base_model(model_name: str, dtype: torch.dtype, adapter_dir: str = "", **load_kwargs):
    """The base model for inference or adapter merging, in ``dtype`` on the CPU: its weights, or
    for a config-only base the seeded random weights its adapter was trained on.
    ``load_kwargs`` go to ``from_pretrained`` (attention kernel, bitsandbytes, device map)."""
    if name_has_weights(model_name):
        return from_pretrained(auto_class(model_config(model_name)), model_name, dtype=dtype,
                               **load_kwargs)
    if load_kwargs.get("quantization_config") is not None:
        raise ConfigError(f"--model_name {model_name} has no weights to quantise (a config that "
                          "the run initialised randomly): drop --quantization")
    record_file = Path(adapter_dir) / RANDOM_BASE_FILE if adapter_dir else None
    if record_file is None or not record_file.is_file():
        raise ConfigError(f"--model_name {model_name} has no weights (a config that the run "
                          "initialised randomly), and " + (
                              f"{adapter_dir} does not say with which seed (no "
                              f"{RANDOM_BASE_FILE}; adapters saved before it existed): "
                              "retrain the adapter" if adapter_dir else
                              "no adapter was given to say with which seed: add --peft_model "
                              "(or --adapter) with the adapter trained on it"))
    record = json.loads(record_file.read_text())
    model = meta_model(model_config(model_name), getattr(torch, record["dtype"]),
                       load_kwargs.get("attn_implementation", "sdpa"))
    return random_init(model, record["seed"], "cpu").to(dtype)


def init_after_adapters(train_cfg) -> bool:
    """Whether the model is a random-init one (a config without weights) built on the meta
    device and materialised by ``SeededInit`` only once its adapters are in place: by each FSDP
    rank unit by unit on its own device, or whole in one process, with the same weights either
    way (4-bit layers are initialised and quantised one at a time). True with no adapter or new
    LoRA adapters, whose initialisation ``SeededInit`` knows; other PEFT methods start from a
    base initialised on the CPU (by rank 0 alone under ``low_cpu_fsdp``)."""
    plain_or_lora = not train_cfg.use_peft or (train_cfg.peft_method == "lora"
                                               and not train_cfg.from_peft_checkpoint)
    return plain_or_lora and not weights_on_disk(train_cfg)


def quantized_at_load(train_cfg) -> bool:
    """Whether bitsandbytes quantises the whole model as it loads (``from_pretrained`` onto
    this rank's device). Otherwise a quantised model is built with 4-bit layers that are
    quantised one at a time where they are materialised: a random-init model, and 4-bit under
    ``low_cpu_fsdp``, where rank 0 reads the full-precision weights and FSDP quantises unit by
    unit on every rank's GPU, so no GPU ever holds the whole 4-bit model."""
    return (bool(train_cfg.quantization) and weights_on_disk(train_cfg)
            and not (train_cfg.low_cpu_fsdp and train_cfg.quantization == "4bit"))


def load_model(train_cfg, dtype: torch.dtype, on_meta: bool, quantization_config=None,
               init_device="cpu"):
    """The causal LM in ``dtype`` on CPU (or on meta), in train mode.

    ``init_device``: where a model without weights on disk is initialised (one process: the
    GPU it will train on; under FSDP: the CPU, and FSDP moves each shard to its GPU).

    ``from_pretrained`` returns a model in eval mode, where transformers skips gradient
    checkpointing and dropout; training code must not inherit that, so we switch to train mode.
    """
    # bitsandbytes quantises onto the device the model will train on
    quantize_on = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    quantize_now = quantization_config is not None and quantized_at_load(train_cfg)
    # no KV cache in training; a vision model's config keeps the setting in its text config
    # (its from_pretrained refuses use_cache=False as a keyword)
    config = model_config(train_cfg.model_name)
    attn = attention_implementation(train_cfg.use_fast_kernels,
                                    packing=train_cfg.batching_strategy == "packing",
                                    config=config)
    config.use_cache = False
    config.get_text_config().use_cache = False
    if on_meta or not weights_on_disk(train_cfg):
        model = meta_model(config, dtype, attn)
        if quantization_config is not None:
            to_4bit_layers(model, quantization_config, dtype)
        if not on_meta:  # one process, no adapters to wait for
            random_init(model, train_cfg.seed, init_device)
    else:
        kwargs = {"dtype": dtype, "attn_implementation": attn, "config": config}
        if quantize_now:
            kwargs.update(quantization_config=quantization_config, device_map={"": quantize_on})
        model = auto_class(config).from_pretrained(resolve_model_path(train_cfg.model_name),
                                                   **kwargs)
        if quantization_config is not None and not quantize_now:  # rank 0 of low_cpu_fsdp
            to_4bit_layers(model, quantization_config, dtype)
    if quantization_config is not None:
        keep_4bit_layout_on_cpu(model)
    if is_vision_config(model.config):
        check_vision_model(model)
    model.train()
    return model


def fit_embeddings_to_tokenizer(model: torch.nn.Module, tokenizer, verbose: bool = True) -> None:
    """Grow the model's embedding (and its output layer) to the tokenizer's size when the
    tokenizer has more tokens (added ones), as llama-recipes does: their ids would index past
    the embedding. New rows start from the old rows' mean and covariance (transformers' mean
    resizing); on the meta device, which holds no values, they are initialised with the rest
    (seeded, or broadcast from rank 0 under low_cpu_fsdp). Before adapters and FSDP wrap it."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return
    if verbose:
        print(f"the tokenizer has {len(tokenizer)} tokens, the model's embedding {rows}: "
              f"resizing the embeddings to {len(tokenizer)}", flush=True)
    on_meta = model.get_input_embeddings().weight.is_meta
    model.resize_token_embeddings(len(tokenizer), mean_resizing=not on_meta)


def keep_4bit_layout_on_cpu(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from re-packing 4-bit weights for its CPU inference kernel.

    In eval mode on a CPU with AVX512-bf16, ``Linear4bit`` replaces its weight's data by a
    differently shaped uint8 layout. Under FSDP that weight is a view into the flat parameter,
    and any state dict taken afterwards fails (bitsandbytes asserts uint8 storage, ours is the
    FSDP dtype): a QLoRA run on CPU crashed at the first save after an evaluation. Training
    never uses that kernel, so turn it off."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def decoder_layer_classes(model: torch.nn.Module) -> set[type]:
    """The transformer block classes of any Hugging Face model, found through the model's own
    ``_no_split_modules`` list (no per-family table to keep up to date)."""
    base = base_model_of(model)
    names = set(getattr(base, "_no_split_modules", None) or [])
    classes = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not classes:
        raise ValueError(f"{type(base).__name__} names no decoder layer class in "
                         f"_no_split_modules ({sorted(names)}); FSDP cannot pick its wrap units")
    return classes


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    classes = tuple(decoder_layer_classes(model))
    return [m for m in model.modules() if isinstance(m, classes)]


def text_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers of the language model: all of them but a vision model's image
    encoder layers (what a layer count, freezing and FLOPs per token are about)."""
    config = getattr(base_model_of(model), "config", None)
    vision = in_vision_parts(model) if is_vision_config(config) else set()
    return [layer for layer in decoder_layers(model) if id(layer) not in vision]


def image_encoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """A vision model's image encoder layers: the decoder layers (``_no_split_modules``) inside
    its image side; none for a causal LM."""
    config = getattr(base_model_of(model), "config", None)
    if not is_vision_config(config):
        return []
    vision = in_vision_parts(model)
    return [layer for layer in decoder_layers(model) if id(layer) in vision]


def freeze_layers(model: torch.nn.Module, num_layers: int) -> None:
    """Freeze the first ``num_layers`` decoder layers of the language model (partial full
    fine-tuning)."""
    for layer in text_layers(model)[:num_layers]:
        layer.requires_grad_(False)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face / PEFT model inside an FSDP or DDP wrapper."""
    return getattr(model, "module", model)
