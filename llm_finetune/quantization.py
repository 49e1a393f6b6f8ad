"""bitsandbytes quantisation: our ``quantization_config`` as ``transformers.BitsAndBytesConfig``."""

import torch


def bnb_config(run, precision):
    """None without ``--quantization``. Under FSDP the packed 4-bit weights are stored in the
    dtype of the other parameters (``bnb_4bit_quant_storage``) so FSDP can flatten them."""
    kind = run.train.quantization
    if not kind:
        return None
    from transformers import BitsAndBytesConfig

    q = run.quantization
    skip = q.skip_modules if q.skip_modules is not None else ["lm_head"]
    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    storage = q.quant_storage or ("bfloat16" if run.train.enable_fsdp else "uint8")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_compute_dtype=getattr(torch, q.compute_dtype),
        bnb_4bit_use_double_quant=q.use_double_quant,
        bnb_4bit_quant_storage=getattr(torch, storage),
        llm_int8_skip_modules=skip,
    )
