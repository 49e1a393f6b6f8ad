"""Peak CPU memory per rank while loading a checkpoint into FSDP, with and without low_cpu_fsdp.

    python benchmarks/low_cpu_fsdp_memory.py [--hidden 1024 --layers 16 --nproc 2]

Saves a randomly initialised Llama-shaped model to a temporary directory, then for each mode
launches ``torchrun --nproc_per_node N`` workers that load it exactly as ``finetuning.main``
does (``load_model`` then ``wrap_fsdp``) and report their peak resident memory
(``ru_maxrss``) above what the interpreter held before loading. Prints a table.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worker(model_dir: str, low_cpu: str) -> None:
    import torch
    import torch.distributed as dist

    from llm_finetune.config_utils import build_run_config
    from llm_finetune.distributed import setup
    from llm_finetune.engine import RankZeroInit, wrap_fsdp
    from llm_finetune.model import load_model

    dist.init_process_group("gloo")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = build_run_config(model_name=model_dir, enable_fsdp=True, low_cpu_fsdp=low_cpu == "1")
    info, _ = setup(need_group=True)
    model = load_model(run.train, torch.float32, on_meta=run.train.low_cpu_fsdp and not info.is_main)
    init_fn = RankZeroInit(model, info) if run.train.low_cpu_fsdp else None
    model = wrap_fsdp(model, run.fsdp, info, torch.float32, init_fn)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # KiB -> GiB
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    if info.is_main:
        print("RESULT " + json.dumps(peaks), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         num_key_value_heads=args.hidden // 256, vocab_size=32000)
    with tempfile.TemporaryDirectory() as tmp:
        model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        size_gib = params * 4 / 2**30
        print(f"model: {params / 1e6:.0f}M parameters, {size_gib:.2f} GiB in fp32, "
              f"{args.nproc} ranks, torch {torch.__version__}")
        print("| mode | " + " | ".join(f"rank {r} peak GiB" for r in range(args.nproc)) + " |")
        print("| --- |" + " ---: |" * args.nproc)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        for low_cpu in ("0", "1"):
            done = subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", str(args.nproc), __file__, "--worker", tmp, low_cpu],
                env=env, capture_output=True, text=True, check=True)
            peaks = json.loads(done.stdout.split("RESULT ", 1)[1].splitlines()[0])
            name = "low_cpu_fsdp" if low_cpu == "1" else "every rank loads"
            print(f"| {name} | " + " | ".join(f"{p:.2f}" for p in peaks) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:4])
    else:
        main()
