"""The timed optimizer steps every hand-written baseline runs (transformers+peft, +liger,
Unsloth), so they are timed alike: random token ids as inputs and labels, ``batch`` sequences
per optimizer step in micro-batches of ``micro``, the median step after ``warmup`` steps, and
the peak of ``torch.cuda.max_memory_allocated`` over them. No llm_finetune import: Unsloth's
process has its own packages."""

import time

import torch


def time_steps(net, optimizer, vocab: int, batch: int, micro: int, seq: int, steps: int,
               warmup: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(batch // micro):
            ids = torch.randint(0, vocab, (micro, seq), device="cuda")
            (net(input_ids=ids, labels=ids).loss / (batch // micro)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_time = sorted(times)[len(times) // 2]
    return {"tokens_per_s": batch * seq / step_time, "step_time_s": step_time,
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
