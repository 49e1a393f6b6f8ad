"""Bytes one decoder layer keeps for backward, per token, measured on the GPU: what the planner's
``activation_bytes_per_token_per_layer`` models (docs/memory.md).

    python benchmarks/layer_activations.py --shapes llama3-8b,llama3.2-1b

For each shape and each way of training (LoRA with our default adapters, full fine-tuning,
QLoRA when bitsandbytes is there), eager and compiled (``--torch_compile``): a model of that
shape with 2 and with 4 decoder layers runs one forward in train mode on ``tokens`` tokens, and
the difference in allocated memory after forward, over 2 layers, is one layer's saved tensors
(the embedding, the final norm and their inputs cancel out). SDPA attention, bf16 (LoRA
adapters in fp32 under autocast, as in single-GPU runs).
"""

import gc
import json

import fire
import torch

from llm_finetune.adapters import apply_peft
from llm_finetune.config_utils import build_run_config
from llm_finetune.engine import compile_layers
from llm_finetune.adapters import base_model_of
from llm_finetune.plan import activation_bytes_per_token_per_layer, count_parameters
from llm_finetune.shapes import SHAPES


def build(shape: str, mode: str, depth: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = SHAPES[shape]()
    config.num_hidden_layers = depth
    with torch.device("cpu" if mode == "qlora" else "cuda"):  # bitsandbytes quantises on .cuda()
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    if mode == "qlora":
        from llm_finetune.quantization import to_4bit_layers
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        to_4bit_layers(model, quant, torch.bfloat16)
    model.cuda()  # bitsandbytes quantises the 4-bit layers as they move
    if mode == "full":
        return model.train()
    run = build_run_config(model_name=shape, use_peft=True)
    return apply_peft(model, run, depth).train()  # fp32 adapters under autocast, as our runs


def forward_bytes(shape: str, mode: str, compiled: bool, depth: int, tokens: int) -> int:
    model = build(shape, mode, depth)
    if compiled:
        compile_layers(model)
    base = base_model_of(model).model
    ids = torch.randint(0, 1000, (1, tokens), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(2):  # the first pass compiles; both leave no gradient behind
            base(input_ids=ids).last_hidden_state.float().sum().backward()
            model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = base(input_ids=ids).last_hidden_state
        torch.cuda.synchronize()
        kept = torch.cuda.memory_allocated() - before
    del out, model, base
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return kept


def main(shapes: str = "llama3-8b,llama3.2-1b", modes: str = "lora,full,qlora",
         tokens: int = 4096) -> list[dict]:
    rows = []
    for shape in (shapes.split(",") if isinstance(shapes, str) else shapes):
        for mode in (modes.split(",") if isinstance(modes, str) else modes):
            if mode == "qlora":
                try:
                    import bitsandbytes  # noqa: F401
                except ImportError:
                    continue
            run = build_run_config(model_name=shape, use_peft=mode != "full",
                                   quantization="4bit" if mode == "qlora" else "")
            for compiled in (False, True):
                planned = activation_bytes_per_token_per_layer(
                    count_parameters(run), 2, frozen_base=mode != "full", compiled=compiled)
                two, four = (forward_bytes(shape, mode, compiled, d, tokens) for d in (2, 4))
                per_token = (four - two) / 2 / tokens
                rows.append({"shape": shape, "mode": mode, "compiled": compiled,
                             "bytes_per_token_per_layer": round(per_token),
                             "planner": round(planned)})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| shape | training | layers | KB per token and layer | planner's KB |")
    print("| --- | --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['shape']} | {r['mode']} | {'compiled' if r['compiled'] else 'eager'} | "
              f"{r['bytes_per_token_per_layer'] / 1000:.0f} | {r['planner'] / 1000:.0f} |")
    return rows


if __name__ == "__main__":
    fire.Fire(main)
