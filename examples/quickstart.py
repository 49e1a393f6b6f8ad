"""Fine-tune from Python (a script or a notebook cell): one process, no torchrun.

    python examples/quickstart.py

Trains LoRA adapters on the built-in tiny model with the shipped data (about 30 s on a laptop
CPU), then generates from the trained model and reloads the saved adapter with plain peft.
"""

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_finetune import finetuning

# LoRA on the tiny model, saved as a standalone base + adapter pair
base_dir = "output/quickstart/base"
tokenizer = AutoTokenizer.from_pretrained("llm_finetune/assets/tiny-llama")
torch.manual_seed(0)
# the tiny model has no weights on disk: give it some so the adapter has a base to load onto
finetuning.main(output_dir="output/quickstart/full", num_epochs=1, max_train_step=200)
base = AutoModelForCausalLM.from_pretrained("output/quickstart/full/model")
base.save_pretrained(base_dir)
tokenizer.save_pretrained(base_dir)

summary = finetuning.main(model_name=base_dir, use_peft=True, num_epochs=1, lr=3e-3,
                          output_dir="output/quickstart/lora", **{"lora_config.r": 16})
print("eval loss per epoch:", summary["eval_loss"])

prompt = ("Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\nWhat is the capital of France?\n\n"
          "### Response:\n")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                  "output/quickstart/lora/model").eval()
ids = tokenizer(prompt, return_tensors="pt").input_ids
ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], dim=1)
out = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id)
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
