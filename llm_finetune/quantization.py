"""bitsandbytes quantisation: our ``quantization_config`` as ``transformers.BitsAndBytesConfig``."""

import importlib.util

import torch
from packaging.version import Version

# the oldest bitsandbytes transformers 5 quantises with
BITSANDBYTES_MIN_VERSION = "0.46.1"

from llm_finetune.errors import ConfigError


def bnb_config(run, precision, keep: tuple[str, ...] = ()):
    """None without ``--quantization``. Under FSDP the packed 4-bit weights are stored in the
    dtype of the other parameters (``bnb_4bit_quant_storage``) so FSDP can flatten them.
    ``keep``: patterns of modules left unquantised besides ``skip_modules`` (a vision model's
    image encoder and projector)."""
    return bits_and_bytes(run.train.quantization, run.quantization, fsdp=run.train.enable_fsdp,
                          keep=keep)


def bits_and_bytes(kind: str, q, fsdp: bool = False, keep: tuple[str, ...] = ()):
    """``kind`` (``4bit``, ``8bit`` or empty) and a ``quantization_config`` as the
    ``BitsAndBytesConfig`` transformers loads with; None when ``kind`` is empty. Module
    patterns in ``skip_modules`` and ``keep`` are matched as transformers matches them
    (``should_convert_module``: a name, a prefix up to a module boundary, or a regex)."""
    if not kind:
        return None
    from transformers import BitsAndBytesConfig

    skip = [*(q.skip_modules if q.skip_modules is not None else ["lm_head"]), *keep]
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    storage = q.quant_storage or ("bfloat16" if fsdp else "uint8")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_use_double_quant=q.use_double_quant,
        bnb_4bit_quant_storage=getattr(torch, storage),
        llm_int8_skip_modules=skip,
    )


def bitsandbytes_problem(kind: str, device: str) -> str:
    """Why ``--quantization kind`` cannot run on ``device`` here (bitsandbytes missing, too old
    for transformers, or built without kernels for that device), naming the fix; "" if it can.
    Asked before any weights load: transformers would find out only once it starts loading."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return (f"--quantization {kind} loads the weights through bitsandbytes, which is not "
                "installed: pip install bitsandbytes (or drop --quantization)")
    import bitsandbytes

    version = getattr(bitsandbytes, "__version__", "0")
    if Version(version) < Version(BITSANDBYTES_MIN_VERSION):
        return (f"--quantization {kind}: bitsandbytes {version} is older than the "
                f"{BITSANDBYTES_MIN_VERSION} transformers needs: pip install -U bitsandbytes")
    devices = getattr(bitsandbytes, "supported_torch_devices", {"cuda"})  # older: CUDA only
    if device not in devices:
        return (f"--quantization {kind}: this bitsandbytes ({version}) has no kernels for "
                f"{device} (it supports {', '.join(sorted(devices))}). Run on a CUDA GPU, "
                "install a bitsandbytes build for this device, or drop --quantization")
    return ""


def is_4bit(tensor) -> bool:
    """A bitsandbytes 4-bit weight (``Params4bit``), quantised or not yet."""
    return type(tensor).__name__ == "Params4bit"


def is_4bit_linear(module: torch.nn.Module) -> bool:
    return is_4bit(getattr(module, "weight", None))


def pending_4bit_like(weight, data: torch.Tensor):
    """A not-yet-quantised ``Params4bit`` with ``weight``'s 4-bit settings holding ``data``
    (full precision, or meta): bitsandbytes quantises it when it is moved to a device."""
    from bitsandbytes.nn import Params4bit

    return Params4bit(data, requires_grad=False, blocksize=weight.blocksize,
                      compress_statistics=weight.compress_statistics,
                      quant_type=weight.quant_type, quant_storage=weight.quant_storage,
                      module=weight.module)


def quantize_pending(module: torch.nn.Module) -> None:
    """Quantise ``module``'s weight in place if it is a 4-bit layer holding real full-precision
    values (on the device those values are on, where bitsandbytes runs its kernel)."""
    weight = getattr(module, "weight", None)
    if is_4bit_linear(module) and not weight.bnb_quantized and not weight.is_meta:
        module.weight = weight.to(weight.device)  # Params4bit.to quantises


def to_4bit_layers(model: torch.nn.Module, quantization_config, dtype: torch.dtype):
    """Replace the linear layers that ``quantization_config`` quantises by bitsandbytes 4-bit
    layers whose weights are not quantised yet: they keep the values they had (real, or meta)
    in ``dtype`` and are quantised one layer at a time where they are materialised (by
    ``SeededInit`` for a random-init model, by ``RankZeroInit`` under ``low_cpu_fsdp``, FSDP
    unit by unit). So no rank ever holds a whole 4-bit model before sharding, and a rank on the
    meta device has the same module tree as the rank that holds the weights."""
    import bitsandbytes as bnb
    from transformers.quantizers.quantizers_utils import should_convert_module

    if not getattr(quantization_config, "load_in_4bit", False):
        raise ValueError("layer-by-layer quantisation is for 4-bit (8-bit needs weights on disk "
                         "and one process)")
    skip = list(quantization_config.llm_int8_skip_modules or [])  # as from_pretrained skips
    convert = [(name, module) for name, module in model.named_modules()
               if type(module) is torch.nn.Linear and should_convert_module(name, skip)]
    for name, linear in convert:
        packed = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=linear.bias is not None,
            compute_dtype=quantization_config.bnb_4bit_compute_dtype,
            compress_statistics=quantization_config.bnb_4bit_use_double_quant,
            quant_type=quantization_config.bnb_4bit_quant_type,
            quant_storage=quantization_config.bnb_4bit_quant_storage, device="meta")
        packed.weight = pending_4bit_like(packed.weight, linear.weight.data.to(dtype))
        if linear.bias is not None:
            packed.bias = torch.nn.Parameter(linear.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, packed)
    model.config.quantization_config = quantization_config
    model.is_loaded_in_4bit = True
    return model


def check_quantization_settings(t, weights_on_disk) -> None:
    """bitsandbytes weights train only under LoRA, 8-bit ones neither sharded nor without a
    checkpoint to quantise as it loads (``weights_on_disk(t)``, asked for 8-bit only)."""
    if t.quantization and not t.use_peft:
        raise ConfigError(f"--quantization {t.quantization} freezes the base weights in a form "
                          "that cannot be trained: add --use_peft (QLoRA)")
    if t.quantization and t.peft_method != "lora":
        raise ConfigError(f"--quantization works with --peft_method lora only (got {t.peft_method})")
    if t.quantization == "8bit" and t.enable_fsdp:
        raise ConfigError("8-bit bitsandbytes weights cannot be sharded by FSDP (their row "
                          "statistics live outside the weight tensor). Use --enable_ddp (a full "
                          "8-bit replica per rank), --quantization 4bit with --enable_fsdp, or "
                          "LoRA on bf16 weights with --enable_fsdp --fsdp_config.pure_bf16 True")
    if t.quantization == "8bit" and not weights_on_disk(t):
        raise ConfigError(f"--quantization 8bit quantises weights as they load, and "
                          f"{t.model_name} has none on disk (a config-only model): use "
                          "--quantization 4bit, which random-init models support")
