"""The other baseline: transformers' ``Trainer`` with accelerate's FSDP, what a user gets from
``--fsdp "full_shard auto_wrap"``; full fine-tuning of a random-init model shape in bf16.

    torchrun --nproc_per_node 2 benchmarks/baseline_trainer_fsdp.py --model llama3-8b --batch 4

The model is built in bf16; accelerate's FSDP mixed precision upcasts it to fp32 master weights
and fp32 AdamW states (like our default, not ``--fsdp_config.pure_bf16``). One FSDP unit per
decoder layer, non-reentrant gradient checkpointing, 2048-token rows of random tokens (no
padding); ``--compile``: the Trainer's own ``torch_compile``. Rank 0 prints one JSON line (and
writes it to ``OUTPUT_DIR/result.json``): tokens/s over all GPUs (median step from the third
on), step time, peak GPU memory per GPU.
"""

import json
import os
import statistics
import tempfile
import time

import fire
import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from llm_finetune.model import decoder_layer_classes, model_config


class RandomRows(torch.utils.data.Dataset):
    def __init__(self, vocab: int, seq: int, rows: int):
        self.ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self.start = [], 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def main(model: str = "llama3-8b", batch: int = 4, seq: int = 2048, steps: int = 10,
         compile: bool = False, output_dir: str = "") -> None:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.cuda.set_device(local_rank)
    torch.manual_seed(0)
    with torch.device("cuda"):
        net = AutoModelForCausalLM.from_config(model_config(model), dtype=torch.bfloat16,
                                               attn_implementation="sdpa")
    net.config.use_cache = False
    layer_names = sorted(cls.__name__ for cls in decoder_layer_classes(net))
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(), torch_compile=compile, per_device_train_batch_size=batch, max_steps=steps,
        bf16=True, learning_rate=1e-5, optim="adamw_torch", logging_steps=1, report_to="none",
        save_strategy="no", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=2,
        fsdp="full_shard auto_wrap", fsdp_config={"transformer_layer_cls_to_wrap": layer_names})
    timer = StepTimer()
    Trainer(model=net, args=args, train_dataset=RandomRows(net.config.vocab_size, seq,
                                                           batch * world * (steps + 1)),
            callbacks=[timer]).train()
    step_time = statistics.median(timer.times[2:])
    result = {"tokens_per_s": world * batch * seq / step_time, "step_time_s": step_time,
              "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
    if local_rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, "result.json"), "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    fire.Fire(main)
