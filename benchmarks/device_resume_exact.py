"""Exact resume on a GPU: an uninterrupted run against one stopped and resumed halfway, on the
settings a user gets (bf16 mixed precision, LoRA dropout, dataloader workers), with and without
``--deterministic``; then the speed that ``--deterministic`` costs.

    python benchmarks/device_resume_exact.py --out OUT [--steps 8]

For each case: run A trains `steps` steps; run B trains `steps/2` steps, saving a training
checkpoint, and a second launch resumes it with ``--resume_from_checkpoint auto`` to `steps`.
The table gives the largest loss difference over the resumed steps (0 means bit for bit).
Speed: tokens/s (median over steps 3+) of the same run with and without ``--deterministic``,
one at a time on the GPU. docs/checkpoints.md has the results.
"""

import argparse
import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_matrix import (COMMON, SHAPES, SMALL, launch, make_shapes, metrics,  # noqa: E402
                           without_flags)

CASES = {
    "LoRA, one process": ("one", ["--use_peft", "True", "--lr", "1e-3"]),
    "LoRA, FSDP (design card)": ("fsdp1", ["--use_peft", "True", "--lr", "1e-3"]),
    "full, FSDP, pure_bf16": ("fsdp1", ["--lr", "1e-4", "--fsdp_config.pure_bf16", "True"]),
}


def command(engine: str, flags: list[str], out: Path, steps: int, extra=()) -> list[str]:
    launch_with = [sys.executable, "-m", "llm_finetune.finetuning"] if engine == "one" else \
        ["torchrun", "--standalone", "--nproc_per_node", "1", "-m", "llm_finetune.finetuning",
         "--enable_fsdp", "True"]
    # the defaults otherwise: one dataloader worker, LoRA dropout 0.05, bf16 mixed precision
    common = without_flags(COMMON, ["--num_workers_dataloader", "--num_epochs"])
    return [*launch_with, "--model_name", str(SHAPES / SMALL), *common, *flags,
            "--num_epochs", "3", "--max_train_step", str(steps), "--save_model", "False",
            "--output_dir", str(out), "--dist_checkpoint_root_folder", str(out / "dcp"), *extra]


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(out) if "loss" in m}


def compare(name: str, deterministic: bool, root: Path, steps: int) -> dict:
    engine, flags = CASES[name]
    flags = flags + (["--deterministic", "True"] if deterministic else [])
    slug = "".join(c if c.isalnum() else "_" for c in name) + ("_det" if deterministic else "")
    a, b = root / slug / "uninterrupted", root / slug / "resumed"
    half = steps // 2
    codes = [launch(command(engine, flags, a, steps), root / f"{slug}.a.log"),
             launch(command(engine, flags, b, half, ["--save_steps", str(half)]),
                    root / f"{slug}.b1.log"),
             launch(command(engine, flags, b, steps, ["--resume_from_checkpoint", "auto"]),
                    root / f"{slug}.b2.log")]
    row = dict(case=name, deterministic=deterministic, exit_codes=codes)
    la, lb = losses(a), losses(b)
    resumed = [s for s in range(half + 1, steps + 1) if s in la and s in lb]
    row["resumed_steps"] = resumed
    row["max_abs_diff"] = max((abs(la[s] - lb[s]) for s in resumed), default=None)
    row["before_diff"] = max((abs(la[s] - lb[s]) for s in range(1, half + 1)
                              if s in la and s in lb), default=None)
    row["losses_a"], row["losses_b"] = la, lb
    for run_dir in (a, b):
        for big in ("checkpoints", "dcp", "model"):
            shutil.rmtree(run_dir / big, ignore_errors=True)
    return row


def speed(root: Path, deterministic: bool, steps: int) -> float | None:
    engine, flags = CASES["LoRA, FSDP (design card)"]
    flags = flags + (["--deterministic", "True"] if deterministic else [])
    out = root / ("speed_det" if deterministic else "speed")
    launch(command(engine, flags, out, steps), root / f"{out.name}.log")
    tps = sorted(m["tokens_per_s"] for m in metrics(out) if "loss" in m and m["step"] > 2)
    return tps[len(tps) // 2] if tps else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--speed_steps", type=int, default=12)
    args = parser.parse_args()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    make_shapes()
    jobs = [(name, det) for name in CASES for det in (True, False)]
    rows = []

    def record(job):  # written as each case ends: a call stopped at its limit keeps them
        rows.append(compare(*job, root, args.steps))
        (root / "resume_exact.json").write_text(json.dumps(rows, indent=1))
        print(json.dumps({k: rows[-1][k] for k in ("case", "deterministic", "exit_codes",
                                                    "max_abs_diff", "before_diff")}), flush=True)

    with ThreadPoolExecutor(len(jobs)) as pool:
        list(pool.map(record, jobs))
    rows.sort(key=lambda r: jobs.index((r["case"], r["deterministic"])))
    lines = ["| case | --deterministic | resumed steps | max loss difference after resume |"
             " before (same start) |", "| --- | --- | --- | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['deterministic']} | {r['resumed_steps']} | "
                     f"{r['max_abs_diff']} | {r['before_diff']} |")
    plain, det = speed(root, False, args.speed_steps), speed(root, True, args.speed_steps)
    lines += ["", "| LoRA, FSDP, 1B, 2 x 2048 | tokens/s |", "| --- | ---: |",
              f"| default | {plain} |", f"| --deterministic | {det} |"]
    report = "\n".join(lines)
    (root / "resume_exact.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
