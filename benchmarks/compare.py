"""llm_finetune against the plain transformers+peft baseline, same model shapes, batch and GPU,
each run in its own process, one after the other; prints a markdown table and writes JSON.

    python benchmarks/compare.py --out results.json                    # every scenario
    python benchmarks/compare.py --only lora_8b_ac,full_1b_ac --steps 10
    python benchmarks/compare.py --check True --only lora_8b_mb1_noac_compile --steps 4

Models are random-init from built-in shapes (no weights downloaded); the QLoRA scenarios need
weights on disk, so the harness first writes a random Llama-3-8B checkpoint (``--workdir``).
Our runs train on the shipped data packed into 2048-token blocks (``--data long``: one
2048-token sample per row, the baseline's shape); tokens/s counts real tokens
(packing padding excluded) and is the median over steps 3 and later; peak is
``torch.cuda.max_memory_allocated``. MFU is the field's convention (torchtitan's): model FLOPs
(6 x parameters per token for full fine-tuning, 4 x for a frozen base, plus attention over the
2048-token sequences; no recompute) over the datasheet bf16 dense peak (989 TFLOP/s on H100/H200
SXM; ``--peak_tflops``); ``MFU meas.`` divides by the measured matmul rate (790) instead.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import fire

from llm_finetune.metrics import (flops_per_token, read_metrics, steady_median,
                                  steady_tokens_per_s)

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Scenario:
    model: str
    mode: str  # lora, qlora, full
    batch: int  # 2048-token sequences per optimizer step, both runners
    ac: bool  # activation checkpointing (the baseline's; ours too unless ``our_ac`` says)
    flags: list[str] = field(default_factory=list)  # ours only
    micro_batch: int = 0  # ours: sequences per forward (with gradient accumulation); 0: batch
    our_ac: bool | None = None


QLORA = ["--use_peft", "--quantization", "4bit", "--quantization_config.use_double_quant", "True"]
COMPILE = ["--torch_compile", "True"]
SCENARIOS = {
    "lora_8b_ac": Scenario("llama3-8b", "lora", 4, True, ["--use_peft"]),
    "lora_8b_noac_b2": Scenario("llama3-8b", "lora", 2, False, ["--use_peft"]),
    "qlora_8b_ac": Scenario("CHECKPOINT", "qlora", 4, True, QLORA),
    "full_1b_ac": Scenario("llama3.2-1b", "full", 4, True, ["--fsdp_config.pure_bf16", "True"]),
    # selective checkpointing: the last N layers keep activations, N the largest the planner
    # fits in the baseline's peak memory (python -m llm_finetune.plan --gpu_memory ...)
    "lora_8b_ac_keep5": Scenario("llama3-8b", "lora", 4, True,
                                 ["--use_peft", "--fsdp_config.no_checkpoint_layers", "5"]),
    "lora_8b_ac_compile": Scenario("llama3-8b", "lora", 4, True, ["--use_peft", *COMPILE]),
    "lora_8b_ac_keep5_compile": Scenario(
        "llama3-8b", "lora", 4, True,
        ["--use_peft", *COMPILE, "--fsdp_config.no_checkpoint_layers", "5"]),
    "lora_8b_ac_keep11_compile": Scenario(
        "llama3-8b", "lora", 4, True,
        ["--use_peft", *COMPILE, "--fsdp_config.no_checkpoint_layers", "11"]),
    "full_1b_ac_keep6_compile": Scenario(
        "llama3.2-1b", "full", 4, True,
        ["--fsdp_config.pure_bf16", "True", *COMPILE, "--fsdp_config.no_checkpoint_layers", "6"]),
    "full_1b_ac_keep6": Scenario("llama3.2-1b", "full", 4, True,
                                 ["--fsdp_config.pure_bf16", "True",
                                  "--fsdp_config.no_checkpoint_layers", "6"]),
    # the same 4 x 2048 tokens per optimizer step as one sequence per forward, accumulated over
    # 4: a quarter of the activations, so none need recomputing (the planner's "fastest" pick)
    "lora_8b_mb1_noac_compile": Scenario("llama3-8b", "lora", 4, True, ["--use_peft", *COMPILE],
                                         micro_batch=1, our_ac=False),
    "qlora_8b_mb1_noac_compile": Scenario("CHECKPOINT", "qlora", 4, True, [*QLORA, *COMPILE],
                                          micro_batch=1, our_ac=False),
}
PARAMS = {"llama3-8b": 8.03e9, "llama3.2-1b": 1.236e9, "CHECKPOINT": 8.03e9}
LAYERS_HIDDEN = {"llama3-8b": (32, 4096), "llama3.2-1b": (16, 2048), "CHECKPOINT": (32, 4096)}
MEASURED_PEAK = 790e12  # bf16 matmul rate measured on the project's H100/H200s


def run_json(cmd: list[str], env: dict, timeout: int = 900) -> tuple[str, dict | None]:
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        return f"timed out after {timeout} s\n{expired.stdout!s}{expired.stderr!s}", None
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


def ours(scenario: Scenario, model: str, extra: list[str], steps: int, out: Path, env: dict,
         data: str = "packed"):
    micro = scenario.micro_batch or scenario.batch
    ac = scenario.ac if scenario.our_ac is None else scenario.our_ac
    if data == "long":
        rows = long_rows(out.parent / "long_rows.jsonl")
        data_flags = ["--dataset", "file_dataset", "--file_dataset.data_files", str(rows),
                      "--batching_strategy", "padding"]
    else:  # the shipped data: the default data set (samsum) would need the hub
        data_flags = ["--dataset", "alpaca_dataset", "--alpaca_dataset.data_path",
                      str(REPO / "llm_finetune" / "assets" / "data" / "tiny_alpaca.json"),
                      "--batching_strategy", "packing"]
    cmd = [sys.executable, "-m", "llm_finetune.finetuning", "--overwrite_output_dir", "True",
           "--model_name", model,
           "--tokenizer_name", "tiny-llama", *data_flags,
           "--context_length", "2048", "--batch_size_training", str(micro),
           "--gradient_accumulation_steps", str(scenario.batch // micro),
           # micro-batches (llama-recipes' unit): `steps` optimizer steps
           "--max_train_step", str(steps * (scenario.batch // micro)), "--num_epochs", "5",
           "--run_validation", "False",
           "--save_model", "False", "--num_workers_dataloader", "2", "--output_dir", str(out),
           "--fsdp_config.fsdp_activation_checkpointing", str(ac), *extra]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.log").write_text(log)  # kept: compiler warnings, the run summary
    if done.returncode != 0 or not (out / "metrics.jsonl").is_file():
        return log, None
    steps_logged, _ = read_metrics(out)
    tokens = steady_tokens_per_s(steps_logged)
    step_time = scenario.batch * 2048 / tokens
    return "", {"tokens_per_s": tokens, "step_time_s": step_time,
                "peak_gpu_mem_gib": steps_logged[-1]["peak_gpu_mem_gib"],
                # the median step's share of time the GPU stood idle waiting for batches
                "data_wait": steady_median(steps_logged, "data_wait_s") / step_time,
                "losses": [step["loss"] for step in steps_logged]}


def model_path(scenario: Scenario, work: Path, env: dict) -> str:
    """The scenario's model: a built-in shape, or for QLoRA a random checkpoint on disk."""
    if scenario.model != "CHECKPOINT":
        return scenario.model
    directory = work / "llama3-8b-random"
    write_checkpoint(directory, env)
    return str(directory)


def without_flags(flags: list[str], dropped: set[str]) -> list[str]:
    """``flags`` (``--name value`` pairs) without the ``dropped`` names and their values."""
    kept, pairs = [], iter(flags)
    for flag in pairs:
        if flag in dropped:
            next(pairs)  # and its value
        else:
            kept.append(flag)
    return kept


def without_levers(scenario: Scenario) -> Scenario:
    """The plain path of ``scenario``: the baseline's micro-batch and checkpointing, eager
    layers, the loss from the full logits."""
    flags = without_flags(scenario.flags, {"--torch_compile", "--fsdp_config.no_checkpoint_layers"})
    return Scenario(scenario.model, scenario.mode, scenario.batch, scenario.ac,
                    [*flags, "--chunked_loss", "False"])


def in_fp32(flags: list[str]) -> list[str]:
    """``flags`` computing in fp32: no bf16 autocast, no bf16 weights, 4-bit layers
    dequantised to fp32. Without bf16 rounding the levers must equal the plain path almost
    exactly, which tells a lever's rounding from a lever's bug."""
    kept = without_flags(flags, {"--fsdp_config.pure_bf16"})
    fp32 = ["--mixed_precision", "False"]
    if "--quantization" in kept:
        fp32 += ["--quantization_config.compute_dtype", "float32"]
    return [*kept, *fp32]


def check_losses(names: list[str], steps: int, work: Path, env: dict, fast_kernels: bool,
                 tolerance: float, fp32: bool = False) -> list[dict]:
    """Each scenario's levers against its plain path (``without_levers``, SDPA): same model,
    data and seed, LoRA dropout off (its masks depend on how a step is split into
    micro-batches), lr 1e-4 (at the default 1e-3 a random-init model's bf16 full fine-tuning is
    unstable and rounding differences grow: measured 3.7% apart by step 4, with the plain
    path's own loss rising); the largest relative difference between their losses over
    ``steps``, within ``tolerance`` or not. ``fp32``: both runs computing in fp32
    (``in_fp32``)."""
    rows = []
    exact = ["--lora_config.lora_dropout", "0", "--lr", "1e-4"]
    for name in names:
        scenario, plain = SCENARIOS[name], without_levers(SCENARIOS[name])
        model = model_path(scenario, work, env)
        fast = ["--use_fast_kernels", "True"] if fast_kernels else []
        precise = in_fp32 if fp32 else list
        runs = [ours(scenario, model, precise([*scenario.flags, *fast, *exact]), steps,
                     work / f"{name}-levers", env),
                ours(plain, model, precise([*plain.flags, *exact]), steps,
                     work / f"{name}-plain", env)]
        for log, result in runs:
            if result is None:
                print(f"{name} failed:\n{log[-3000:]}", flush=True)
        if all(result for _, result in runs):
            levers, base = (result["losses"] for _, result in runs)
            largest = max(abs(a - b) / abs(b) for a, b in zip(levers, base))
            rows.append({"scenario": name, "levers": levers, "plain": base,
                         "max_relative_difference": largest,
                         "within_tolerance": largest <= tolerance})
            print(f"| {name} | {len(levers)} | {levers[0]:.4f} -> {levers[-1]:.4f} | "
                  f"{base[0]:.4f} -> {base[-1]:.4f} | {largest:.1e} | "
                  f"{'yes' if largest <= tolerance else 'NO'} |", flush=True)
    return rows


def write_checkpoint(directory: Path, env: dict, shape: str = "llama3-8b") -> None:
    """A random model of ``shape`` in bf16 safetensors, initialised on the GPU, with tiny-llama's
    tokenizer beside it: what from_pretrained with a BitsAndBytesConfig needs (weights on
    disk), and what Unsloth loads."""
    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        return  # written by an earlier scenario (one file or shards, as transformers chose)
    code = ("import torch; from transformers import AutoTokenizer; "
            "from llm_finetune.model import BUILTIN_MODELS, meta_model, random_init; "
            "from llm_finetune.shapes import SHAPES; "
            f"m = random_init(meta_model(SHAPES['{shape}'](), torch.bfloat16, 'sdpa'), 0, 'cuda'); "
            f"m.save_pretrained('{directory}'); "
            f"AutoTokenizer.from_pretrained(BUILTIN_MODELS['tiny-llama']).save_pretrained('{directory}')")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, timeout=900)


def main(only: str = "", steps: int = 8, out: str = "benchmark.json", peak_tflops: float = 989,
         workdir: str = "", data: str = "packed", fast_kernels: bool = False,
         check: bool = False, tolerance: float = 1e-2, fp32: bool = False) -> list[dict]:
    """``fast_kernels``: our runs with ``--use_fast_kernels``. ``data``: ``packed`` (the
    shipped samples packed into 2048-token blocks, kept apart by the attention mask) or
    ``long`` (one 2048-token sample per row, the baseline's shape). ``check``: instead of
    timing, each scenario's losses against its plain path (``check_losses``), at a relative
    ``tolerance`` (1e-2 for bf16 runs; fp32 runs agree to 1e-5); ``fp32``: the check with
    both runs computing in fp32."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    work = Path(workdir or tempfile.mkdtemp(prefix="llm-finetune-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    wanted = only.split(",") if isinstance(only, str) else list(only)  # fire: a,b -> tuple
    names = [n for n in SCENARIOS if not only or n in wanted]
    if check:
        print("| scenario | steps | loss with levers | plain path | largest relative difference "
              f"| within {tolerance:.0e} |")
        print("| --- | ---: | --- | --- | ---: | --- |")
        rows = check_losses(names, steps, work, env, fast_kernels, tolerance, fp32)
        Path(out).write_text(json.dumps(rows, indent=1))
        return rows
    rows, baselines = [], {}
    for name in names:
        scenario = SCENARIOS[name]
        model = model_path(scenario, work, env)
        key = (model, scenario.mode, scenario.batch, scenario.ac)
        if key not in baselines:  # one baseline run serves every scenario of the same shape
            baselines[key] = run_json(
                [sys.executable, "benchmarks/baseline_hf_peft.py", "--mode", scenario.mode,
                 "--model", model, "--batch", str(scenario.batch), "--seq", "2048",
                 "--steps", str(steps), "--ac", str(scenario.ac)], env)
        base_log, base = baselines[key]
        our_extra = [*scenario.flags, "--use_fast_kernels", "True"] if fast_kernels else scenario.flags
        our_log, mine = ours(scenario, model, our_extra, steps + 2, work / f"{name}-{data}", env,
                             data)
        for label, result, log in (("baseline", base, base_log), ("ours", mine, our_log)):
            if result is None:
                print(f"{name} {label} failed:\n{log[-3000:]}", flush=True)
        per_token = flops_per_token(PARAMS[scenario.model],
                                    PARAMS[scenario.model] if scenario.mode == "full" else 0,
                                    *LAYERS_HIDDEN[scenario.model], 2048)
        for label, result in (("transformers+peft", base), ("llm_finetune", mine)):
            if result:
                result["mfu"] = result["tokens_per_s"] * per_token / (peak_tflops * 1e12)
                result["mfu_measured"] = result["tokens_per_s"] * per_token / MEASURED_PEAK
            rows.append({"scenario": name, "runner": label, **(result or {})})
        if base and mine:
            rows[-1]["speedup"] = mine["tokens_per_s"] / base["tokens_per_s"]
            rows[-1]["memory_ratio"] = mine["peak_gpu_mem_gib"] / base["peak_gpu_mem_gib"]
        print_table(rows)
        Path(out).write_text(json.dumps(rows, indent=1))  # after each scenario: kept if cut off
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| scenario | runner | tokens/s | step s | peak GiB | MFU | MFU meas. | "
          "speed vs baseline | memory vs baseline | waiting for data |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['scenario']} | {r['runner']} | failed | | | | | | | |")
            continue
        ratio = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        memory = f"{r['memory_ratio']:.2f}x" if "memory_ratio" in r else ""
        waiting = f"{r['data_wait']:.2%}" if "data_wait" in r else ""  # the baseline loads none
        print(f"| {r['scenario']} | {r['runner']} | {r['tokens_per_s']:,.0f} | "
              f"{r['step_time_s']:.2f} | {r['peak_gpu_mem_gib']:.1f} | {r['mfu']:.0%} | "
              f"{r['mfu_measured']:.0%} | {ratio} | "
              f"{memory} | {waiting} |", flush=True)


if __name__ == "__main__":
    fire.Fire(main)
