"""The baseline: the training loop a user writes by hand with transformers + peft (what
llama-recipes does on one GPU), on the same model shape and batch as our runs.

    python benchmarks/baseline_hf_peft.py --mode lora --model llama3-8b --batch 4 --seq 2048

``--mode lora``: bf16 weights, LoRA r8 q,v (peft keeps adapters in fp32), ``qlora``: NF4 double
quant from a checkpoint directory (``--model DIR``), ``full``: bf16 weights and AdamW states.
``--ac``: transformers' gradient checkpointing (with ``enable_input_require_grads``, as its docs
say for PEFT). Prints one JSON line: tokens/s over the timed steps, step time, peak GPU memory.
"""

import json
import time

import fire
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

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


def main(mode: str = "lora", model: str = "llama3-8b", batch: int = 4, seq: int = 2048,
         steps: int = 8, warmup: int = 2, ac: bool = True) -> dict:
    torch.manual_seed(0)
    net = build(mode, model)
    net.config.use_cache = False
    if ac:
        net.gradient_checkpointing_enable()
    if mode in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if ac:
            net.enable_input_require_grads()
        net = get_peft_model(net, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    net.train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    vocab = net.config.vocab_size
    times = []
    for step in range(warmup + steps):
        ids = torch.randint(0, vocab, (batch, seq), device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_time = sorted(times)[len(times) // 2]
    result = {"tokens_per_s": batch * seq / step_time, "step_time_s": step_time,
              "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    print("RESULT " + json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    fire.Fire(main)
