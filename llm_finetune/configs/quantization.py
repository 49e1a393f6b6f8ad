"""bitsandbytes quantisation settings, turned into ``transformers.BitsAndBytesConfig``."""

from dataclasses import dataclass


@dataclass
class quantization_config:
    quant_type: str = "nf4"  # nf4 | fp4 (4bit only)
    compute_dtype: str = "bfloat16"
    use_double_quant: bool = False
    # dtype the packed 4-bit weights are stored in; under FSDP it must equal the dtype of the
    # other parameters so that FSDP can flatten and shard them together ("" : chosen for you)
    quant_storage: str = ""
    skip_modules: list[str] = None  # modules kept unquantised (default: lm_head)
