"""DPO with LoRA: llm_finetune's ``--method dpo`` against TRL's ``DPOTrainer``, same model shape,
same preference pairs, same LoRA, same batch, same GPU, each runner in its own process.

    python benchmarks/dpo_vs_trl.py --model llama3-8b --pairs 4 --out dpo.json
    python benchmarks/dpo_vs_trl.py --model tiny-llama --steps 3 --device cpu   # the harness itself

The model is random-init from a built-in shape (no weights downloaded), bf16, LoRA r8 q,v (both
libraries' defaults from llama-recipes' lora_config), beta 0.1, sigmoid loss, lr 1e-4; the
reference is the model with its LoRA off in both. The pairs: a 256-token prompt and two 768-token
responses of random token ids (the tiny model's tokenizer; the text they decode to re-tokenises
to somewhat more tokens, which are what both runners count), nothing truncated. tokens/s counts both sides' tokens (prompt included;
ours counts them in each batch, TRL's from the file's mean pair), the median over steps 3 and later; peak is ``torch.cuda.max_memory_allocated``.
Runners: ``ours`` (no activation checkpointing, SDPA, all pairs in one forward), ``ours_ac``,
``ours_compile`` (``--torch_compile``), ``ours_mb1_compile`` (one pair per forward, accumulated),
``trl`` (its defaults: no gradient checkpointing) and ``trl_ac`` (``gradient_checkpointing``).
Prints a markdown table and writes JSON.
"""

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import fire

from llm_finetune.metrics import read_metrics, steady_tokens_per_s

REPO = Path(__file__).resolve().parent.parent
PROMPT_TOKENS, RESPONSE_TOKENS = 256, 768
MAX_LENGTH = 2 * (PROMPT_TOKENS + RESPONSE_TOKENS)  # room: nothing is truncated
RUNNERS = ("ours", "ours_ac", "ours_compile", "ours_mb1_compile", "trl", "trl_ac")


def tokenizer():
    from transformers import AutoTokenizer

    from llm_finetune.model import BUILTIN_MODELS

    tok = AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def write_pairs(path: Path, count: int) -> float:
    """Rows {prompt, chosen, rejected} of random tokens; returns the mean tokens of a pair,
    both sides with the prompt (decoding and re-tokenising random ids merges a few)."""
    tok, generator = tokenizer(), random.Random(0)

    def text(n):
        return tok.decode([generator.randrange(3, 1024) for _ in range(n)])

    def tokens(s):
        return len(tok(s, add_special_tokens=False)["input_ids"])

    total = 0
    with path.open("w") as f:
        for _ in range(count):
            row = {"prompt": text(PROMPT_TOKENS), "chosen": " " + text(RESPONSE_TOKENS),
                   "rejected": " " + text(RESPONSE_TOKENS)}
            total += 2 * tokens(row["prompt"]) + tokens(row["chosen"]) + tokens(row["rejected"])
            f.write(json.dumps(row) + "\n")
    return total / count


def our_variant(name: str, pairs: int) -> tuple[list[str], int]:
    """(flags, micro-batches per optimizer step) of one of our runners."""
    ac = name.endswith("_ac")
    flags = ["--fsdp_config.fsdp_activation_checkpointing", str(ac)]
    if "compile" in name:
        flags += ["--torch_compile", "True"]
    micro = 1 if "_mb1" in name else pairs  # pairs per forward
    flags += ["--batch_size_training", str(micro), "--gradient_accumulation_steps",
              str(pairs // micro)]
    return flags, pairs // micro


def run_ours(model: str, pairs_file: Path, pairs: int, steps: int, name: str, out: Path) -> dict:
    flags, accumulation = our_variant(name, pairs)
    cmd = [sys.executable, "-m", "llm_finetune.finetuning", "--method", "dpo", "--use_peft",
           "--model_name", model, "--tokenizer_name", "tiny-llama",
           "--dataset", "file_dataset", "--file_dataset.data_files", str(pairs_file),
           "--context_length", str(MAX_LENGTH),
           "--max_train_step", str(steps * accumulation),  # micro-batches
           "--num_epochs", "10", "--run_validation", "False", "--save_model", "False",
           "--lr", "1e-4", "--dpo_beta", "0.1", "--num_workers_dataloader", "2",
           *flags, "--overwrite_output_dir", "True", "--output_dir", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"error": (done.stdout + done.stderr)[-1500:]}
    steps_logged, _ = read_metrics(out)
    return {"tokens_per_s": steady_tokens_per_s(steps_logged),
            "peak_gib": max(s["peak_gpu_mem_gib"] or 0.0 for s in steps_logged),
            "losses": [s["loss"] for s in steps_logged],
            "reward_accuracy": [s.get("reward_accuracy") for s in steps_logged]}


def run_trl(model: str, pairs_file: Path, pairs: int, steps: int, ac: bool, out: Path,
            device: str) -> dict:
    """TRL's DPOTrainer with a PEFT config (its reference: the adapter disabled)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from llm_finetune.model import model_config

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        net = AutoModelForCausalLM.from_config(model_config(model), dtype=dtype,
                                               attn_implementation="sdpa")
    data = load_dataset("json", data_files=str(pairs_file), split="train")
    config = DPOConfig(output_dir=str(out), per_device_train_batch_size=pairs,
                       gradient_accumulation_steps=1, max_steps=steps, learning_rate=1e-4,
                       lr_scheduler_type="constant", beta=0.1, loss_type=["sigmoid"],
                       bf16=device == "cuda", gradient_checkpointing=ac,
                       max_length=MAX_LENGTH, logging_steps=1,
                       report_to=[], save_strategy="no", dataloader_num_workers=2,
                       use_cpu=device == "cpu", seed=0)
    timer = StepTimes()
    trainer = DPOTrainer(model=net, args=config, train_dataset=data, processing_class=tokenizer(),
                         peft_config=LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05,
                                                target_modules=["q_proj", "v_proj"],
                                                task_type="CAUSAL_LM"),
                         callbacks=[timer])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tokens_per_step = pairs * json.loads((out.parent / "pair_tokens.json").read_text())
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    accuracy = [h.get("rewards/accuracies") for h in trainer.state.log_history if "loss" in h]
    step_s = statistics.median(timer.times[2:] or timer.times)  # steps 3 on, as ours
    return {"tokens_per_s": tokens_per_step / step_s,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
            "losses": losses, "reward_accuracy": accuracy}


def main(model: str = "llama3-8b", pairs: int = 4, steps: int = 8, out: str = "dpo_vs_trl.json",
         only: str = ",".join(RUNNERS), device: str = "cuda", workdir: str = "/tmp/dpo_vs_trl",
         runner: str = "") -> None:
    work = Path(workdir)
    pairs_file = work / "pairs.jsonl"
    if runner:  # one runner, in this process (called by the loop below)
        ac = runner.endswith("_ac")
        if runner.startswith("trl"):
            result = run_trl(model, pairs_file, pairs, steps, ac, work / runner, device)
        else:
            result = run_ours(model, pairs_file, pairs, steps, runner, work / runner)
        print("RESULT " + json.dumps(result))
        return
    work.mkdir(parents=True, exist_ok=True)
    pair_tokens = write_pairs(pairs_file, pairs * (steps + 2))
    (work / "pair_tokens.json").write_text(json.dumps(pair_tokens))
    results = {}
    names = only.split(",") if isinstance(only, str) else list(only)  # fire: a,b is a tuple
    for name in names:
        done = subprocess.run([sys.executable, __file__, "--runner", name, "--model", model,
                               "--pairs", str(pairs), "--steps", str(steps), "--device", device,
                               "--workdir", workdir], cwd=REPO, capture_output=True, text=True,
                              timeout=1200)
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        results[name] = (json.loads(lines[-1][7:]) if lines
                         else {"error": (done.stdout + done.stderr)[-1500:]})
        print(name, json.dumps(results[name])[:400], flush=True)
    Path(out).write_text(json.dumps({"model": model, "pairs_per_step": pairs,
                                     "tokens_per_pair": pair_tokens,
                                     "results": results}, indent=1))
    best_trl = max((r["tokens_per_s"] for n, r in results.items()
                    if n.startswith("trl") and "tokens_per_s" in r), default=None)
    print(f"\n{model}, LoRA r8 q,v DPO, {pairs} pairs of {pair_tokens:.0f} tokens (both sides) "
          "per step\n")
    print("| runner | tokens/s | peak GiB | vs best TRL | first losses |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, r in results.items():
        if "tokens_per_s" not in r:
            print(f"| {name} | failed | | | {r['error'][-200:]!r} |")
            continue
        ratio = f"{r['tokens_per_s'] / best_trl:.2f}x" if best_trl else ""
        losses = ", ".join(f"{x:.4f}" for x in r["losses"][:3])
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {ratio} | {losses} |")


if __name__ == "__main__":
    fire.Fire(main)
