"""A markdown table of the finished runs under a directory (each ``*/metrics.jsonl``): steps,
first and last loss, median tokens/s from the third step on, last peak GPU memory.

    python benchmarks/runs_table.py OUT_DIR
"""

import sys
from pathlib import Path

from llm_finetune.metrics import read_metrics, steady_tokens_per_s


def main(root: str) -> None:
    print("| run | steps | loss first -> last | tokens/s (median, step 3+) | peak GiB allocated |")
    print("| --- | ---: | --- | ---: | ---: |")
    for metrics in sorted(Path(root).glob("*/metrics.jsonl")):
        steps, _ = read_metrics(metrics.parent)
        if len(steps) < 4:
            continue
        print(f"| {metrics.parent.name} | {len(steps)} | {steps[0]['loss']:.3f} -> "
              f"{steps[-1]['loss']:.3f} | {steady_tokens_per_s(steps):,.0f} | "
              f"{steps[-1]['peak_gpu_mem_gib']:.1f} |")


if __name__ == "__main__":
    main(sys.argv[1])
