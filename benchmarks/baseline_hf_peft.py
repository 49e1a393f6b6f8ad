"""The baselines written with transformers + peft: the training loop a user writes by hand (what
llama-recipes does on one GPU), and the same loop tuned with liger-kernel's fused kernels at its
fastest micro-batch and checkpointing within a memory budget.

    python benchmarks/baseline_hf_peft.py --mode lora --model llama3-8b --batch 4 --seq 2048
    python benchmarks/baseline_hf_peft.py --mode lora --liger True --search 1,2,4 --budget_gib 28.9

``--mode lora``: bf16 weights, LoRA r8 q,v (peft keeps adapters in fp32), ``qlora``: NF4 double
quant from a checkpoint directory (``--model DIR``), ``full``: bf16 weights and AdamW states.
``--ac``: transformers' gradient checkpointing (with ``enable_input_require_grads``, as its docs
say for PEFT). ``--liger``: liger-kernel's RMSNorm, SwiGLU, RoPE and fused linear cross-entropy
patched into transformers' Llama before the model is built (``apply_liger_kernel_to_llama``).
``--search``: instead of one setting, every micro-batch in the list (accumulating to ``batch``
sequences per optimizer step) with and without checkpointing, timed in this one process; the
fastest whose peak stays within ``--budget_gib`` is the result, every trial listed beside it.
Prints one JSON line: tokens/s over the timed steps, step time, peak GPU memory.
"""

import json

import fire
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from benchmarks.timing import time_steps
from llm_finetune.model import model_config


def build(mode: str, model: str):
    if mode == "qlora":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(model, quantization_config=quant,
                                                    dtype=torch.bfloat16, device_map={"": 0})
    config = model_config(model)
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def set_checkpointing(net, mode: str, ac: bool) -> None:
    base = net.get_base_model() if mode in ("lora", "qlora") else net
    adapters = mode in ("lora", "qlora")
    if adapters:
        base.disable_input_require_grads()  # one hook at most across the search's trials
    if ac:
        base.gradient_checkpointing_enable()
        if adapters:
            base.enable_input_require_grads()
    else:
        base.gradient_checkpointing_disable()


def main(mode: str = "lora", model: str = "llama3-8b", batch: int = 4, seq: int = 2048,
         steps: int = 8, warmup: int = 2, ac: bool = True, liger: bool = False,
         search: str = "", budget_gib: float = 0.0) -> dict:
    torch.manual_seed(0)
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
    net = build(mode, model)
    net.config.use_cache = False
    if mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    net.train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    vocab = net.config.vocab_size
    # fire reads 1,2,4 as a tuple
    micros = [int(m) for m in (search.split(",") if isinstance(search, str) else search or [])
              if str(m)]
    if not micros:
        set_checkpointing(net, mode, ac)
        result = time_steps(net, optimizer, vocab, batch, batch, seq, steps, warmup)
        print("RESULT " + json.dumps(result), flush=True)
        return result
    trials = []
    # least memory first: an out-of-memory trial ends the search of larger ones
    for checkpointing in (True, False):
        for micro in sorted(micros):
            if batch % micro:
                continue
            set_checkpointing(net, mode, checkpointing)
            trial = {"micro_batch": micro, "ac": checkpointing}
            try:
                trial |= time_steps(net, optimizer, vocab, batch, micro, seq, steps, warmup)
            except torch.OutOfMemoryError:
                trial["oom"] = True
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            trials.append(trial)
            print(json.dumps(trial), flush=True)
    fitting = [t for t in trials if "tokens_per_s" in t
               and (not budget_gib or t["peak_gpu_mem_gib"] <= budget_gib)]
    if not fitting:
        print("RESULT " + json.dumps({"trials": trials}), flush=True)
        return {}
    best = max(fitting, key=lambda t: t["tokens_per_s"])
    result = {**best, "trials": trials}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    fire.Fire(main)
