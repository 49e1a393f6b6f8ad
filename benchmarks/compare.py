"""llm_finetune against the plain transformers+peft baseline, same model shapes, batch and GPU,
each run in its own process, one after the other; prints a markdown table and writes JSON.

    python benchmarks/compare.py --out results.json                    # every scenario
    python benchmarks/compare.py --only lora_8b_ac,full_1b_ac --steps 10

Models are random-init from built-in shapes (no weights downloaded); the QLoRA scenarios need
weights on disk, so the harness first writes a random Llama-3-8B checkpoint (``--workdir``).
Our runs train on the shipped data packed into 2048-token blocks (``--data long``: one
2048-token sample per row, the baseline's shape); tokens/s counts real tokens
(packing padding excluded) and is the median over steps 3 and later; peak is
``torch.cuda.max_memory_allocated``. MFU counts model FLOPs only (6 x parameters per token for
full fine-tuning, 4 x for a frozen base: no weight gradients; no recompute, no attention) over
the GPU's bf16 dense peak (``--peak_tflops``, 790 measured on H100/H200 SXM).
"""

import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import fire

from llm_finetune.metrics import read_metrics, steady_tokens_per_s

REPO = Path(__file__).resolve().parent.parent
# name: (model, mode, batch, activation checkpointing, our extra flags)
SCENARIOS = {
    "lora_8b_ac": ("llama3-8b", "lora", 4, True, ["--use_peft"]),
    "lora_8b_noac_b2": ("llama3-8b", "lora", 2, False, ["--use_peft"]),
    "qlora_8b_ac": ("CHECKPOINT", "qlora", 4, True,
                    ["--use_peft", "--quantization", "4bit",
                     "--quantization_config.use_double_quant", "True"]),
    "full_1b_ac": ("llama3.2-1b", "full", 4, True, ["--fsdp_config.pure_bf16", "True"]),
    # selective checkpointing: the last N layers keep activations, N the largest the planner
    # fits in the baseline's peak memory (python -m llm_finetune.plan --gpu_memory ...)
    "lora_8b_ac_keep5": ("llama3-8b", "lora", 4, True,
                         ["--use_peft", "--fsdp_config.no_checkpoint_layers", "5"]),
    "lora_8b_ac_compile": ("llama3-8b", "lora", 4, True, ["--use_peft", "--torch_compile", "True"]),
    "lora_8b_ac_keep5_compile": ("llama3-8b", "lora", 4, True,
                                 ["--use_peft", "--torch_compile", "True",
                                  "--fsdp_config.no_checkpoint_layers", "5"]),
    "full_1b_ac_keep6_compile": ("llama3.2-1b", "full", 4, True,
                                 ["--fsdp_config.pure_bf16", "True", "--torch_compile", "True",
                                  "--fsdp_config.no_checkpoint_layers", "6"]),
    "full_1b_ac_keep6": ("llama3.2-1b", "full", 4, True,
                         ["--fsdp_config.pure_bf16", "True",
                          "--fsdp_config.no_checkpoint_layers", "6"]),
}
PARAMS = {"llama3-8b": 8.03e9, "llama3.2-1b": 1.236e9, "CHECKPOINT": 8.03e9}


def run_json(cmd: list[str], env: dict) -> tuple[str, dict | None]:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        return log, None
    return log, json.loads(next(line for line in log.splitlines()
                                if line.startswith("RESULT "))[len("RESULT "):])


def long_rows(path: Path) -> Path:
    """Rows of over 2048 tokens (truncated to it): one sample per row and no padding, the
    baseline's batch shape, so attention needs no mask."""
    from llm_finetune.model import BUILTIN_MODELS
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    generator = random.Random(0)
    with path.open("w") as f:
        for i in range(400):
            text = tokenizer.decode([generator.randrange(3, 1024) for _ in range(2300)])
            f.write(json.dumps({"instruction": f"Continue {i}.", "input": "", "output": text}) + "\n")
    return path


def ours(model: str, batch: int, ac: bool, extra: list[str], steps: int, out: Path, env: dict,
         data: str = "packed"):
    if data == "long":
        rows = long_rows(out.parent / "long_rows.jsonl")
        data_flags = ["--dataset", "file_dataset", "--file_dataset.data_files", str(rows),
                      "--batching_strategy", "padding"]
    else:
        data_flags = ["--batching_strategy", "packing"]
    cmd = [sys.executable, "-m", "llm_finetune.finetuning", "--model_name", model,
           "--tokenizer_name", "tiny-llama", *data_flags,
           "--context_length", "2048", "--batch_size_training", str(batch),
           "--max_train_step", str(steps), "--num_epochs", "5", "--run_validation", "False",
           "--save_model", "False", "--num_workers_dataloader", "2", "--output_dir", str(out),
           "--fsdp_config.fsdp_activation_checkpointing", str(ac), *extra]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0 or not (out / "metrics.jsonl").is_file():
        return done.stdout + done.stderr, None
    steps_logged, _ = read_metrics(out)
    tokens = steady_tokens_per_s(steps_logged)
    return "", {"tokens_per_s": tokens, "step_time_s": batch * 2048 / tokens,
                "peak_gpu_mem_gib": steps_logged[-1]["peak_gpu_mem_gib"]}


def write_checkpoint(directory: Path, env: dict) -> None:
    """A random Llama-3-8B in bf16 safetensors, initialised on the GPU (what from_pretrained
    with a BitsAndBytesConfig needs: weights on disk)."""
    if (directory / "model.safetensors.index.json").is_file():
        return
    code = ("import torch; from llm_finetune.model import meta_model, random_init; "
            "from llm_finetune.shapes import SHAPES; "
            "m = random_init(meta_model(SHAPES['llama3-8b'](), torch.bfloat16, 'sdpa'), 0, 'cuda'); "
            f"m.save_pretrained('{directory}')")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=900)


def main(only: str = "", steps: int = 8, out: str = "benchmark.json", peak_tflops: float = 790,
         workdir: str = "", data: str = "packed", fast_kernels: bool = False) -> list[dict]:
    """``fast_kernels``: our runs with ``--use_fast_kernels``. ``data``: ``packed`` (the shipped samples packed into 2048-token blocks, kept apart by
    the attention mask) or ``long`` (one 2048-token sample per row, the baseline's shape)."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    work = Path(workdir or tempfile.mkdtemp(prefix="llm-finetune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = only.split(",") if isinstance(only, str) else list(only)  # fire: a,b -> tuple
    names = [n for n in SCENARIOS if not only or n in wanted]
    rows = []
    for name in names:
        model, mode, batch, ac, extra = SCENARIOS[name]
        if model == "CHECKPOINT":
            model = str(work / "llama3-8b-random")
            write_checkpoint(Path(model), env)
        base_log, base = run_json(
            [sys.executable, "benchmarks/baseline_hf_peft.py", "--mode", mode, "--model", model,
             "--batch", str(batch), "--seq", "2048", "--steps", str(steps), "--ac", str(ac)], env)
        our_extra = [*extra, "--use_fast_kernels", "True"] if fast_kernels else extra
        our_log, mine = ours(model, batch, ac, our_extra, steps + 2, work / f"{name}-{data}", env,
                             data)
        for label, result, log in (("baseline", base, base_log), ("ours", mine, our_log)):
            if result is None:
                print(f"{name} {label} failed:\n{log[-3000:]}", flush=True)
        flops_per_token = (6 if mode == "full" else 4) * PARAMS[SCENARIOS[name][0]]
        for label, result in (("transformers+peft", base), ("llm_finetune", mine)):
            if result:
                result["mfu"] = result["tokens_per_s"] * flops_per_token / (peak_tflops * 1e12)
            rows.append({"scenario": name, "runner": label, **(result or {})})
        if base and mine:
            rows[-1]["speedup"] = mine["tokens_per_s"] / base["tokens_per_s"]
            rows[-1]["memory_ratio"] = mine["peak_gpu_mem_gib"] / base["peak_gpu_mem_gib"]
        print_table(rows)
        Path(out).write_text(json.dumps(rows, indent=1))  # after each scenario: kept if cut off
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| scenario | runner | tokens/s | step s | peak GiB | MFU | speed vs baseline | "
          "memory vs baseline |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['scenario']} | {r['runner']} | failed | | | | | |")
            continue
        ratio = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        memory = f"{r['memory_ratio']:.2f}x" if "memory_ratio" in r else ""
        print(f"| {r['scenario']} | {r['runner']} | {r['tokens_per_s']:,.0f} | "
              f"{r['step_time_s']:.2f} | {r['peak_gpu_mem_gib']:.1f} | {r['mfu']:.0%} | {ratio} | "
              f"{memory} |", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
