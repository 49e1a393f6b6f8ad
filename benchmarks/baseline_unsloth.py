"""The Unsloth baseline: its patched Llama (fused LoRA, RoPE, RMSNorm, SwiGLU and cross-entropy
kernels, its offloaded gradient checkpointing), timed with the same loop as the other baselines
(benchmarks/timing.py). Runs in a process of its own, with Unsloth's packages
(benchmarks/peer_wheels.sh: it pins datasets 4 and trl 1.15), offline.

    python benchmarks/baseline_unsloth.py --mode lora --model DIR --batch 4 --micro 1 --ac False

``--model``: a checkpoint directory (weights and a tokenizer: Unsloth loads both from disk).
``--mode lora``: 16-bit base, ``qlora``: its NF4 double-quant loading, ``full``:
``full_finetuning=True``. LoRA is r8 alpha 32 on q,v as in the other runners, with dropout 0:
Unsloth's fused LoRA kernels only run without dropout, and a user tuning for speed sets it so.
``--ac``: Unsloth's gradient checkpointing (``"unsloth"``), else none.
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fire  # noqa: E402
import torch  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402  (before transformers, as Unsloth asks)

from benchmarks.timing import time_steps  # noqa: E402


def main(mode: str = "lora", model: str = "", batch: int = 4, micro: int = 4, seq: int = 2048,
         steps: int = 8, warmup: int = 2, ac: bool = True) -> dict:
    checkpointing = "unsloth" if ac else False
    net, _ = FastLanguageModel.from_pretrained(
        model_name=model, max_seq_length=seq, dtype=torch.bfloat16,
        load_in_4bit=mode == "qlora", load_in_16bit=mode == "lora",
        full_finetuning=mode == "full", use_gradient_checkpointing=checkpointing)
    if mode != "full":
        net = FastLanguageModel.get_peft_model(
            net, r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
            use_gradient_checkpointing=checkpointing, random_state=0)
    FastLanguageModel.for_training(net)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    result = time_steps(net, optimizer, net.config.vocab_size, batch, micro, seq, steps, warmup)
    result |= {"micro_batch": micro, "ac": ac}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    fire.Fire(main)
