"""The Llama Guard 3 1B preset on one GPU: configs/llama_guard3_1b_full.yaml on a random-init
model of that shape (``llama-guard3-1b``, llm_finetune/shapes.py), trained on Llama Guard
examples this script writes, formatted by llama_guard_dataset with every augmentation on.

    bash benchmarks/device_llama_guard.sh OUT                            # on the GPU machine
    python benchmarks/device_llama_guard.py --out OUT --model_name tiny-llama --steps 2  # CPU

Prints, and writes to OUT/summary.json: tokens/s (median over steps 3 and later), the measured
peak (``torch.cuda.max_memory_allocated``), the planner's peak for the same settings, and
whether the saved model loads with plain transformers and writes a verdict's tokens. The
tokenizer is the built-in tiny one (ids below 1024 fit any vocabulary), so nothing is
downloaded.
"""

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PRESET = REPO / "configs" / "llama_guard3_1b_full.yaml"
SUBJECTS = ["my neighbour", "a coworker", "the city council", "a stranger online", "my landlord",
            "a famous singer", "the school", "my bank", "a delivery driver", "an old friend"]
ASKS = ["How do I write a polite complaint to {}?", "What is a good birthday gift for {}?",
        "Tell me how to hurt {} without getting caught.", "Find the home address of {}.",
        "Write an insulting joke about {}.", "How can I get back at {}?"]
ANSWERS = ["Here is a short, friendly draft you could adapt.", "I can't help with that.",
           "Start by checking public records and social media.", "Sure, here is one."]


def make_examples(path: Path, rows: int = 600, seed: int = 0) -> Path:
    """Llama Guard rows (prompt, optional response, label, codes of the 13 categories)."""
    rng = random.Random(seed)
    with open(path, "w") as out:
        for _ in range(rows):
            row = {"prompt": rng.choice(ASKS).format(rng.choice(SUBJECTS))}
            if rng.random() < 0.5:
                row["response"] = rng.choice(ANSWERS)
            unsafe = rng.random() < 0.5
            row["label"] = "unsafe" if unsafe else "safe"
            row["violated_category_codes"] = sorted(
                rng.sample([f"S{i}" for i in range(1, 14)], rng.randint(1, 2))) if unsafe else []
            out.write(json.dumps(row) + "\n")
    return path


def settings(data: Path, model_name: str, tokenizer_name: str) -> dict:
    """The preset, on the shape and our data, every augmentation on."""
    return {"config": str(PRESET), "model_name": model_name, "tokenizer_name": tokenizer_name,
            "llama_guard_dataset.data_files": str(data),
            "llama_guard_dataset.shuffle_categories": True,
            "llama_guard_dataset.drop_categories": True,
            "llama_guard_dataset.drop_violated_categories": True}


def train(out: Path, run: dict, steps: int, timeout: int) -> int:
    run = {**run, "max_train_step": steps, "max_eval_step": 2, "num_workers_dataloader": 2,
           "plot_metrics": False, "output_dir": str(out / "run"), "overwrite_output_dir": True}
    command = [sys.executable, "-m", "llm_finetune.finetuning",
               *[part for key, value in run.items() for part in (f"--{key}", str(value))]]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="1")
    print("$", " ".join(command), flush=True)
    with open(out / "train.log", "w") as log:
        try:
            return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=REPO, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


def planned_peak(run: dict, gpu_memory: str | None) -> float:
    """The planner's peak GiB for the run's settings (its table's **peak** row)."""
    from llm_finetune import plan

    text = plan.main(gpu_memory=gpu_memory, **run)
    row = next(line for line in text.splitlines() if line.startswith("| **peak**"))
    return float(row.split("**")[3])


def check_saved(model_dir: Path, data: Path, tokenizer_name: str) -> str:
    """Load the saved model with plain transformers and let it write a few tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llm_finetune.data.llama_guard import (FormatterConfig, GuardExample, load_guidelines,
                                               render)
    from llm_finetune.model import resolve_model_path

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device)
    except Exception as error:  # reported in the summary: a result nothing loads is a failure
        return f"does not load: {type(error).__name__}: {str(error)[:200]}"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_name))
    row = json.loads(data.read_text().splitlines()[0])
    guidelines = load_guidelines("llama_guard_3_1b")
    prompt, _ = render(GuardExample(prompt=row["prompt"], label="safe"), guidelines,
                       FormatterConfig(), list(range(len(guidelines.categories))))
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] - ids.shape[1]
    parameters = sum(p.numel() for p in model.parameters())
    return f"loads with transformers ({parameters / 1e6:,.1f}M parameters), generates {new} tokens"


def main(out: str, model_name: str = "llama-guard3-1b", steps: int = 20,
         tokenizer_name: str = "tiny-llama", timeout: int = 150, rows: int = 600,
         overrides: dict | None = None) -> dict:
    """``overrides``: settings over the preset's (the CPU test's fp32 and shorter blocks: bf16
    matmuls on a CPU take minutes)."""
    import torch

    from llm_finetune.metrics import read_metrics, steady_tokens_per_s

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = make_examples(out / "guard.jsonl", rows)
    run = {**settings(data, model_name, tokenizer_name), **(overrides or {})}
    rc = train(out, run, steps, timeout)
    summary = {"model": model_name, "steps": steps, "rc": rc}
    if rc != 0:
        summary["error"] = (out / "train.log").read_text().strip().splitlines()[-1][-300:]
    else:
        records, _ = read_metrics(out / "run")
        peaks = [r["peak_gpu_mem_gib"] for r in records if r.get("peak_gpu_mem_gib")]
        summary.update(
            losses=[round(r["loss"], 4) for r in records],
            tokens_per_s=round(steady_tokens_per_s(records)),
            peak_gib=round(max(peaks), 2) if peaks else None,
            saved=check_saved(out / "run" / "model", data, tokenizer_name))
    # the planner's estimate for the same settings: for this GPU, or a 24 GiB one without GPU
    gpu_memory = None if torch.cuda.is_available() else "24GiB"
    summary["planned_peak_gib"] = planned_peak(run, gpu_memory)
    if summary.get("peak_gib"):
        summary["planner_error"] = f"{summary['planned_peak_gib'] / summary['peak_gib'] - 1:+.1%}"
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2), flush=True)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model_name", default="llama-guard3-1b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tokenizer_name", default="tiny-llama")
    parser.add_argument("--timeout", type=int, default=150, help="seconds for the training run")
    args = parser.parse_args()
    summary = main(**vars(args))
    sys.exit(0 if summary["rc"] == 0 and summary.get("saved", "").startswith("loads") else 1)
