"""Issue 17's last levers against our compiled layers, in one call on one GPU, each run in its
own process: whole-decoder compile (patched in by benchmarks/with_lever.py) and float8 training
(``--float8``, torchao; for LoRA, which the flag refuses, patched in). Prints a markdown table,
writes JSON (docs/performance.md).

    python benchmarks/levers.py --only full_1b,lora_8b --steps 6 --out levers.json

Each row: the scenario's setting (micro-batch, layers recomputed) with the plain compiled
layers, then the same with a lever. 4 x 2048-token sequences per optimizer step, the shipped
samples packed, random-init models of the real shape; LoRA dropout 0 as in the tuned rows of
benchmarks/peers.py. Each lever's losses are compared step by step with those of the row it is
measured against (same data, same seed): a lever that changed what is computed shows there.
"""

import json
import os
import sys
from pathlib import Path

import fire

from benchmarks.cost_points import point_flags
from benchmarks.peers import BATCH, ours

REPO = Path(__file__).resolve().parent.parent
LORA = ["--use_peft", "--lora_config.lora_dropout", "0"]
# scenario -> (shape, mode flags, [(name, micro-batch, layers kept out of checkpointing
# (-1: checkpointing off), LEVER, flags of ours, the row it is compared with)])
F8 = ["--float8", "True"]  # a lever that became a flag (llm_finetune/float8.py)
SCENARIOS = {
    "full_1b": ("llama3.2-1b", ["--fsdp_config.pure_bf16", "True"], [
        ("compiled layers, 4 per forward, no AC", 4, -1, "", [], None),
        ("whole-decoder compile, 4 per forward, no AC", 4, -1, "decoder_compile", [], 0),
        ("--float8, compiled layers, 4 per forward, no AC", 4, -1, "", F8, 0),
        ("--float8, whole-decoder compile, 4 per forward, no AC", 4, -1, "decoder_compile", F8,
         0),
        ("compiled layers, 2 per forward, 2 of 16 recomputed", 2, 14, "", [], None),
        ("whole-decoder compile, 2 per forward, 2 of 16 recomputed", 2, 14, "decoder_compile",
         [], 4),
    ]),
    "lora_8b": ("llama3-8b", LORA, [
        ("compiled layers, 1 per forward, 10 of 32 recomputed", 1, 22, "", [], None),
        ("whole-decoder compile, 1 per forward, 10 of 32 recomputed", 1, 22, "decoder_compile",
         [], 0),
        # float8 before it was a flag (which refuses LoRA): benchmarks/with_lever.py's
        ("float8, compiled layers, 1 per forward, 10 of 32 recomputed", 1, 22, "float8", [], 0),
        ("compiled layers, 1 per forward, no AC", 1, -1, "", [], 0),
    ]),
}


def main(only: str = "full_1b,lora_8b", steps: int = 6, out: str = "levers.json",
         workdir: str = "/tmp/levers", rows_only: str = "") -> list[dict]:
    """``rows_only``: run only the rows whose names contain one of these (``;``-separated)."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    launcher = [sys.executable, str(REPO / "benchmarks" / "with_lever.py")]
    rows = []
    names = only.split(",") if isinstance(only, str) else list(only)
    for scenario in names:
        shape, mode_flags, points = SCENARIOS[scenario]
        for index, (name, micro, kept, lever, lever_flags, base) in enumerate(points):
            if rows_only and not any(part in name for part in rows_only.split(";")):
                continue
            run_dir = Path(workdir) / f"{scenario}-{index}"
            flags = [*mode_flags, *point_flags(micro, kept, True), *lever_flags]
            result = ours(shape, flags, steps * BATCH // micro, run_dir,
                          {**env, "LEVER": lever}, launcher)
            rows.append({"scenario": scenario, "index": index, "base": base, "point": name,
                         "lever": lever, "micro_batch": micro, "kept": kept,
                         **(result or {"failed": True, "losses": []})})
            print(json.dumps(rows[-1]), flush=True)
            Path(out).write_text(json.dumps(rows, indent=1))
    print_table(rows)
    return rows


def print_table(rows: list[dict]) -> None:
    print("| scenario | setting | tokens/s | peak GiB | against | loss, largest difference |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    speed = {(row["scenario"], row["index"]): row.get("tokens_per_s") for row in rows}
    curve = {(row["scenario"], row["index"]): row.get("losses") for row in rows}
    for row in rows:
        if row.get("failed"):
            print(f"| {row['scenario']} | {row['point']} | failed | | | |")
            continue
        base = speed.get((row["scenario"], row["base"]))
        ratio = f"{row['tokens_per_s'] / base:.2f}x row {row['base']}" if base else ""
        reference = curve.get((row["scenario"], row["base"])) or []
        gaps = [abs(a - b) / b for a, b in zip(row["losses"], reference)]
        gap = f"{max(gaps):.2%} over {len(gaps)} steps" if gaps else ""
        print(f"| {row['scenario']} | {row['index']}: {row['point']} | "
              f"{row['tokens_per_s']:,.0f} | {row['peak_gpu_mem_gib']:.1f} | {ratio} | {gap} |")


if __name__ == "__main__":
    fire.Fire(main)
