"""Step times of our runs at pinned settings (micro-batch, checkpointing, compiled layers,
attention), the measurements the planner's step-time model is checked against
(benchmarks/cost_model_check.py, docs/performance.md).

    python benchmarks/cost_points.py --shape llama3.2-1b --mode full --steps 6 --out points.json
"""

import json
import os
import sys
from pathlib import Path

import fire

from benchmarks.peers import BATCH, QLORA, ours

REPO = Path(__file__).resolve().parent.parent
MODE_FLAGS = {"full": ["--fsdp_config.pure_bf16", "True"], "lora": ["--use_peft"],
              "qlora": QLORA}
# (name, micro-batch, layers kept out of checkpointing (-1: checkpointing off), compiled, flex)
POINTS = [("mb4 AC eager", 4, 0, False, False), ("mb4 no-AC compiled", 4, -1, True, False),
          ("mb1 no-AC compiled", 1, -1, True, False), ("mb4 no-AC compiled, flex", 4, -1, True, True)]


def point_flags(micro: int, kept: int, compiled: bool) -> list[str]:
    checkpointing = ["--fsdp_config.fsdp_activation_checkpointing", "False"] if kept < 0 else [
        "--fsdp_config.fsdp_activation_checkpointing", "True",
        "--fsdp_config.no_checkpoint_layers", str(kept)]
    return ["--batch_size_training", str(micro), "--gradient_accumulation_steps",
            str(BATCH // micro), *checkpointing, "--torch_compile", str(compiled)]


def main(shape: str = "llama3.2-1b", mode: str = "full", steps: int = 6,
         out: str = "points.json", workdir: str = "/tmp/points", only: str = "") -> list[dict]:
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    rows = []
    for name, micro, kept, compiled, flex in POINTS:
        if only and name not in only.split(";"):
            continue
        launcher = [sys.executable, "benchmarks/with_flex.py"] if flex else None
        # --max_train_step counts micro-batches of the batch as given
        result = ours(shape, [*MODE_FLAGS[mode], *point_flags(micro, kept, compiled)],
                      steps * BATCH // micro, Path(workdir) / name.replace(" ", "_"), env,
                      launcher)
        rows.append({"shape": shape, "mode": mode, "point": name, "micro_batch": micro,
                     "kept": kept, "compiled": compiled, "flex": flex, **(result or {})})
        print(json.dumps(rows[-1]), flush=True)
        Path(out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    fire.Fire(main)
