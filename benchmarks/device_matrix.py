"""The GPU matrix: every documented combination of method, engine, precision and checkpoint,
a few steps each on a random-init real shape, one table row per cell.

    python benchmarks/device_matrix.py --out OUT [--only NAME,NAME] [--parallel 4] [--gpus 1]

Each cell is its own launch (`python -m llm_finetune.finetuning` or `torchrun`); then its
output is loaded with plain transformers/peft (an FSDP sharded checkpoint first goes through
`python -m llm_finetune.convert dcp_to_hf`) and generates a few tokens. A cell that the config
check refuses (exit 2) shows as `refused` with the reason; anything else that fails is a crash.
Cells marked `resume` save a training checkpoint at step 2, then a second launch resumes it
and runs one more step. Results: OUT/matrix.md (the table) and OUT/matrix.json.

Cells run `--parallel` at a time on the same GPU: peak memory is each process's own, tokens/s
is indicative only (time the speed with benchmarks/compare.py). docs/gpu_runs.md has the table.
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = Path("/tmp/matrix-shapes")
SMALL = "llama3.2-1b"
BIG = "llama3-8b"
STEPS = 6
NOT_SAVED = "--save_model"  # 8B cells other than the design card's: the 1B cells check saving
SHIPPED_DATA = str(REPO / "llm_finetune" / "assets" / "data" / "tiny_alpaca.json")
# the shipped data: llama-recipes' default data set (samsum) would need the hub
COMMON = ["--tokenizer_name", "tiny-llama", "--dataset", "alpaca_dataset",
          "--alpaca_dataset.data_path", SHIPPED_DATA, "--batching_strategy", "packing",
          "--context_length", "2048", "--batch_size_training", "2", "--num_epochs", "1",
          "--run_validation", "False", "--num_workers_dataloader", "2", "--plot_metrics", "False"]
FULL, PEFT = ["--lr", "1e-4"], ["--use_peft", "True", "--lr", "1e-3"]
METHODS = {
    "full": FULL,
    "lora": PEFT,
    "qlora": PEFT + ["--quantization", "4bit"],
    # 8-bit quantises as the weights load: a model with weights on disk
    "8bit": PEFT + ["--quantization", "8bit", "--model_name", "{weights}"],
    "llama_adapter": PEFT + ["--peft_method", "llama_adapter"],
    # prefix tuning's KV cache does not survive activation checkpointing, and packed samples
    # would see each other through it: both refused, so padding and no checkpointing
    "prefix": PEFT + ["--peft_method", "prefix", "--batching_strategy", "padding",
                      "--fsdp_config.fsdp_activation_checkpointing", "False"],
}
PRECISIONS = {
    "default": [],
    "pure_bf16": ["--fsdp_config.pure_bf16", "True"],
    "fp16": ["--use_fp16", "True"],
    "fp32": ["--mixed_precision", "False", "--fsdp_config.mixed_precision", "False"],
}
CHECKPOINTS = {
    "SHARDED": ["--fsdp_config.checkpoint_type", "SHARDED_STATE_DICT"],
    "FULL": ["--fsdp_config.checkpoint_type", "FULL_STATE_DICT"],
}


def cells(gpus: int) -> list[dict]:
    """(name, engine, flags, shape, resume) of every cell."""
    engines = ["one", "fsdp1", "ddp"] + (["fsdp2"] if gpus >= 2 else [])
    out = []

    def add(name, engine, flags, shape=SMALL, resume=False):
        out.append(dict(name=name, engine=engine, flags=flags, shape=shape, resume=resume))

    # every method on every engine, default precision and checkpoint
    for method, flags in METHODS.items():
        for engine in engines:
            add(f"{method}/{engine}/default", engine, flags, resume=method == "lora")
    # every precision for full fine-tuning and LoRA on each engine
    for method in ("full", "lora", "qlora"):
        for precision, flags in PRECISIONS.items():
            if precision == "default":
                continue
            for engine in engines:
                add(f"{method}/{engine}/{precision}", engine, METHODS[method] + flags)
    # both FSDP checkpoint types (the adapter is written by peft whatever the type)
    for method in ("full", "lora"):
        for kind, flags in CHECKPOINTS.items():
            add(f"{method}/fsdp1/{kind}", "fsdp1", METHODS[method] + flags,
                resume=(method, kind) == ("full", "SHARDED"))
    # combinations that cannot work: refused before loading, never a crash
    add("prefix+checkpointing/fsdp1/default", "fsdp1", PEFT + ["--peft_method", "prefix"])
    # the design card's command and the README's GPU examples
    add("design-card: --enable_fsdp --use_peft (1B)", "fsdp1", ["--use_peft", "True"])
    add("design-card: --enable_fsdp --use_peft (8B)", "fsdp1", ["--use_peft", "True"], shape=BIG)
    add("design-card --use_fp16 (8B)", "fsdp1", ["--use_peft", "True", "--use_fp16", "True",
                                                  NOT_SAVED, "False"], shape=BIG)
    add("README --low_cpu_fsdp --use_peft (1B, weights on disk)", "fsdp1",
        ["--use_peft", "True", "--low_cpu_fsdp", "True", "--model_name", "{weights}"])
    # nothing pinned: the GPU defaults choose attention, micro-batch and checkpointing
    # (planned for a share of the GPU, which the parallel cells share), and a resume repeats it
    unpinned = ["--gpu_memory", "24GiB"]
    add("GPU defaults: --use_peft, nothing pinned (1B)", "one", ["--use_peft", "True", *unpinned],
        resume=True)
    add("GPU defaults: design card, nothing pinned (1B)", "fsdp1", ["--use_peft", "True", *unpinned])
    # the presets in configs/, with a real shape and the shipped data in place of hub downloads
    for preset in ("llama3_8b_lora", "llama3_8b_full_fsdp"):
        add(f"configs/{preset}.yaml", "fsdp1", ["--config", f"configs/{preset}.yaml",
                                                "--alpaca_dataset.data_path", SHIPPED_DATA,
                                                NOT_SAVED, "False"], shape=BIG)
    add("configs/tiny_lora.yaml", "one", ["--config", "configs/tiny_lora.yaml"], shape="tiny")
    return out


def command(cell: dict, out: Path, steps: int, extra: list[str] = ()) -> list[str]:
    launch = {"one": [sys.executable, "-m", "llm_finetune.finetuning"],
              "fsdp1": ["torchrun", "--standalone", "--nproc_per_node", "1", "-m",
                        "llm_finetune.finetuning", "--enable_fsdp", "True"],
              "fsdp2": ["torchrun", "--standalone", "--nproc_per_node", "2", "-m",
                        "llm_finetune.finetuning", "--enable_fsdp", "True"],
              "ddp": ["torchrun", "--standalone", "--nproc_per_node", "1", "-m",
                      "llm_finetune.finetuning", "--enable_ddp", "True"]}[cell["engine"]]
    flags = [f.format(weights=str(SHAPES / "llama3.2-1b-weights")) for f in cell["flags"]]
    # a preset's own settings come first; ours replace what cannot run here (hub names, files)
    preset = flags[:2] if flags[:1] == ["--config"] else []
    rest = flags[len(preset):]
    model = [] if "--model_name" in rest or cell["shape"] == "tiny" else \
        ["--model_name", str(SHAPES / cell["shape"])]
    common = [] if cell["shape"] == "tiny" else without_flags(COMMON, rest)
    if "nothing pinned" in cell["name"]:  # llama-recipes' default batch, for the defaults to split
        common = without_flags(common, ["--batch_size_training"])
    return [*launch, *preset, *model, *common, *rest, "--max_train_step", str(steps),
            "--output_dir", str(out), "--dist_checkpoint_root_folder", str(out / "dcp"), *extra]


def without_flags(pairs: list[str], overrides: list[str]) -> list[str]:
    """`pairs` (flag, value, flag, value...) less the flags that `overrides` sets."""
    return [x for flag, value in zip(pairs[::2], pairs[1::2]) if flag not in overrides
            for x in (flag, value)]


def launch(cmd: list[str], log: Path, timeout: int = 900) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="1")
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        try:
            return subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def refusal(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    return lines[-1][len("error: "):] if lines else ""


def last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text().splitlines()
             if "Error" in line or "error" in line]
    return lines[-1][-200:] if lines else log.read_text().strip().splitlines()[-1][-200:]


def run_cell(cell: dict, root: Path) -> dict:
    slug = cell["name"].replace("/", "_").replace(" ", "_").replace(":", "").replace("+", "_")
    slug = "".join(c for c in slug if c.isalnum() or c in "._-")
    out = root / slug
    out.mkdir(parents=True, exist_ok=True)
    row = dict(cell, slug=slug)
    row.pop("resume")
    extra = ["--save_steps", "2", "--save_total_limit", "1"] if cell["resume"] else []
    start = time.time()
    rc = launch(command(cell, out / "run", STEPS, extra), out / "train.log")
    row["seconds"] = round(time.time() - start, 1)
    row["rc"] = rc
    if rc != 0 and refusal(out / "train.log"):  # torchrun exits 1 when its worker exits 2
        row["status"], row["note"] = "refused", refusal(out / "train.log")
        return row
    if rc != 0:
        row["status"], row["note"] = "crash", last_error(out / "train.log")
        remove_weights(out)
        return row
    steps = [m for m in metrics(out / "run") if "loss" in m]
    losses = [m["loss"] for m in steps]
    row["losses"] = losses
    row["peak_gib"] = max((m.get("peak_gpu_mem_gib") or 0) for m in steps) if steps else None
    tps = [m["tokens_per_s"] for m in steps[2:]] or [m["tokens_per_s"] for m in steps]
    row["tokens_per_s"] = round(sorted(tps)[len(tps) // 2]) if tps else None
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    falling = finite and min(losses[-2:]) < losses[0]
    row["loss"] = "falling" if falling else ("finite, not falling" if finite else "NOT FINITE")
    row["output"] = "not saved (the 1B cells check saving)" if NOT_SAVED in cell["flags"] \
        else check_output(cell, out)
    if cell["resume"]:
        row["resume"] = check_resume(cell, out)
    remove_weights(out)  # the disk holds a few cells' checkpoints, not all of them
    ok = falling and row["output"].startswith(("loads", "not saved")) and row.get("resume") in (None, "ok")
    row["status"] = "ok" if ok else "FAIL"
    return row


def remove_weights(out: Path) -> None:
    import shutil

    for name in ("run", "resumed", "hf"):
        for big in ("model", "dcp", "checkpoints"):
            shutil.rmtree(out / name / big, ignore_errors=True)
    shutil.rmtree(out / "hf", ignore_errors=True)


def check_resume(cell: dict, out: Path) -> str:
    """Resume the step-2 checkpoint in a copy of the run's directory, one step past the end."""
    import shutil

    resumed = out / "resumed"
    shutil.rmtree(resumed, ignore_errors=True)
    shutil.copytree(out / "run", resumed, ignore=shutil.ignore_patterns("model", "dcp",
                                                                        "adapter_model.*"))
    rc = launch(command(cell, resumed, STEPS + 1, ["--save_model", "False", "--save_steps", "2",
                                                   "--save_total_limit", "1",
                                                   "--resume_from_checkpoint", "auto"]),
                out / "resume.log")
    if rc != 0:
        return f"resume exit {rc}: {last_error(out / 'resume.log')}"
    steps = [m["step"] for m in metrics(resumed) if "loss" in m]
    return "ok" if steps and steps[-1] == STEPS + 1 else f"resumed steps {steps}"


def check_output(cell: dict, out: Path) -> str:
    """Load the saved result with plain transformers/peft and generate from it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from llm_finetune.model import resolve_model_path

    run_dir = out / "run"
    model_dir = run_dir / "model"  # full weights; an adapter is in run_dir itself
    dcp = sorted((run_dir / "dcp").glob("fine-tuned-*")) if (run_dir / "dcp").is_dir() else []
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny-llama"))
    try:
        if dcp:
            hf = out / "hf"
            shape = SHAPES / cell["shape"]
            rc = launch([sys.executable, "-m", "llm_finetune.convert", "dcp_to_hf",
                         "--checkpoint", str(dcp[0]), "--model_name", str(shape),
                         "--tokenizer_name", "tiny-llama", "--output", str(hf)],
                        out / "convert.log")
            if rc != 0:
                return f"convert exit {rc}: {last_error(out / 'convert.log')}"
            model, how = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16), \
                "loads (DCP -> convert -> transformers)"
        elif (run_dir / "adapter_config.json").is_file():
            from peft import PeftModel

            config = json.loads((run_dir / "adapter_config.json").read_text())
            base_path = config["base_model_name_or_path"]
            base_config = AutoConfig.from_pretrained(resolve_model_path(base_path))
            with torch.device("cuda"):  # random values: the check is that the adapter loads
                base = AutoModelForCausalLM.from_config(base_config, dtype=torch.bfloat16)
            model, how = PeftModel.from_pretrained(base, run_dir), "loads (peft adapter)"
        elif (model_dir / "config.json").is_file():
            model, how = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16), \
                "loads (transformers)"
        else:
            return "no output found"
        model = model.to("cuda").eval()
        ids = tokenizer("### Instruction:\nAdd 2 and 3.\n\n### Response:\n",
                        return_tensors="pt").input_ids.to("cuda")
        with torch.no_grad():
            new = model.generate(ids, max_new_tokens=8, do_sample=False).shape[1] - ids.shape[1]
        del model
        torch.cuda.empty_cache()
        return f"{how}, generates {new} tokens" if new > 0 else f"{how}, generated nothing"
    except Exception as error:  # recorded in the table: a result nothing can load is a failure
        return f"does not load: {type(error).__name__}: {str(error)[:160]}"


def make_shapes() -> None:
    """Config-only directories (random init) for the shapes, and a 1B with weights on disk."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_finetune.shapes import SHAPES as BUILTIN

    SHAPES.mkdir(parents=True, exist_ok=True)
    for name in (SMALL, BIG):
        BUILTIN[name]().save_pretrained(SHAPES / name)
    weights = SHAPES / "llama3.2-1b-weights"
    if not (weights / "model.safetensors").is_file():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(BUILTIN[SMALL](), dtype=torch.bfloat16)
        model.save_pretrained(weights)


def alone(cell: dict) -> bool:
    """Cells run one at a time: the 8B ones (memory matters there) and full fine-tuning with
    training checkpoints (each holds fp32 weights and AdamW states: 15 GB at 1B)."""
    return cell["shape"] == BIG or (cell["resume"] and "--use_peft" not in cell["flags"])


def table(rows: list[dict]) -> str:
    lines = ["| cell | status | loss | peak GiB | tokens/s | output | resume | note |",
             "| --- | --- | --- | ---: | ---: | --- | --- | --- |"]
    for r in rows:
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
            r["name"], r["status"], r.get("loss", ""), r.get("peak_gib", "") or "",
            r.get("tokens_per_s", "") or "", r.get("output", ""), r.get("resume", ""),
            r.get("note", "").replace("|", "/")[:220]))
    return "\n".join(lines)


def main() -> None:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="", help="comma-separated substrings of cell names")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--size", default="all", choices=["all", "small", "big"],
                        help="small: the 1B and tiny cells; big: the 8B cells")
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    args = parser.parse_args()
    root = Path(args.out)
    make_shapes()
    chosen = [c for c in cells(args.gpus)
              if (not args.only or any(s in c["name"] for s in args.only.split(",")))
              and (args.size == "all" or alone(c) == (args.size == "big"))]
    # alone on the GPU: the 8B cells (memory matters there) and the full fine-tuning resume
    # (its checkpoints take a quarter of the disk)
    big = [c for c in chosen if alone(c)]
    small = [c for c in chosen if not alone(c)]
    rows = []

    def record(cell):  # written as each cell ends: a run stopped at its time limit keeps them
        row = run_cell(cell, root / "cells")
        rows.append(row)
        (root / "matrix.json").write_text(json.dumps(rows, indent=1))
        print(json.dumps({k: row.get(k) for k in ("name", "status", "loss", "peak_gib",
                                                  "tokens_per_s", "output", "resume", "note",
                                                  "seconds")}), flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(record, small))
    for cell in big:
        record(cell)
    order = {c["name"]: i for i, c in enumerate(chosen)}
    rows.sort(key=lambda r: order[r["name"]])
    report = table(rows)
    (root / "matrix.md").write_text(report + "\n")
    print(report)
    bad = [r["name"] for r in rows if r["status"] in ("crash", "FAIL")]
    print(f"\n{len(rows)} cells: {sum(r['status'] == 'ok' for r in rows)} ok, "
          f"{sum(r['status'] == 'refused' for r in rows)} refused, {len(bad)} crash/fail")


if __name__ == "__main__":
    main()
