"""PEFT method settings, mapped one-to-one onto ``peft`` config classes."""

from dataclasses import dataclass, field


@dataclass
class lora_config:
    r: int = 8
    lora_alpha: int = 32
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"
    task_type: str = "CAUSAL_LM"
    lora_dropout: float = 0.05
    inference_mode: bool = False
    # ours: on a vision model, adapt target_modules in the image encoder's layers too (by
    # default LoRA adapts the language model only; docs/vision.md). Not a peft field
    vision_encoder: bool = False


@dataclass
class llama_adapter_config:
    adapter_len: int = 10
    adapter_layers: int = 30  # capped at the model's layer count
    task_type: str = "CAUSAL_LM"


@dataclass
class prefix_config:
    num_virtual_tokens: int = 30
    task_type: str = "CAUSAL_LM"
