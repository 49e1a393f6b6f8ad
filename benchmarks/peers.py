"""llm_finetune against tuned peers, on one GPU in one call, each runner in its own process:
the hand-written transformers+peft loop (a beginner's: checkpointing on, 4 sequences per
forward), the same loop with liger-kernel at its fastest micro-batch and checkpointing within
the beginner's memory (searched), Unsloth with and without its checkpointing, and ours with
only the design card's flags (the GPU defaults decide) and ours tuned within the best peer's
memory. Prints a markdown table and writes JSON (docs/performance.md).

    bash benchmarks/peer_wheels.sh        # here: the wheels, then carry .whl and .whl-peers
    python benchmarks/peers.py --only lora_8b --steps 6 --out peers.json   # on the GPU machine

Every runner trains 4 x 2048-token sequences per optimizer step on a random-init model of the
real shape. The baselines feed random unpacked rows; ours trains the shipped samples packed into
2048-token blocks, kept apart by the attention mask. ``--unsloth_site``: the directory Unsloth's
packages are installed in (``pip install --target``; apart from ours, since it pins versions ours
do not use); empty: no Unsloth rows.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import fire

from benchmarks.compare import LAYERS_HIDDEN, MEASURED_PEAK, PARAMS, run_json, write_checkpoint
from llm_finetune.metrics import flops_per_token, read_metrics, steady_tokens_per_s
from llm_finetune.plan import AUTO_FIT_SHARE

REPO = Path(__file__).resolve().parent.parent
BATCH, SEQ = 4, 2048


@dataclass
class PeerScenario:
    shape: str  # a built-in shape (written to disk for the runners that load from disk)
    mode: str  # lora, qlora, full
    our_flags: list[str]


QLORA = ["--use_peft", "--quantization", "4bit", "--quantization_config.use_double_quant", "True"]
SCENARIOS = {
    "lora_8b": PeerScenario("llama3-8b", "lora", ["--use_peft"]),
    "qlora_8b": PeerScenario("llama3-8b", "qlora", QLORA),
    "full_1b": PeerScenario("llama3.2-1b", "full", ["--fsdp_config.pure_bf16", "True"]),
}


def budget_flags(peak_gib: float) -> list[str]:
    """Ours planned within ``peak_gib``: ``--auto_fit`` plans for a share of ``--gpu_memory``."""
    return ["--auto_fit", "True", "--gpu_memory", f"{peak_gib / AUTO_FIT_SHARE:.2f}GiB"]


def ours(model: str, flags: list[str], steps: int, out: Path, env: dict,
         launcher: list[str] | None = None) -> dict | None:
    """One run of ours with ``flags`` and nothing else pinned: the batch of 4 sequences is
    llama-recipes' default, so the GPU defaults (or ``--auto_fit``) may split it. ``launcher``:
    the command instead of ``python -m llm_finetune.finetuning`` (a lever's wrapper)."""
    command = launcher or [sys.executable, "-m", "llm_finetune.finetuning"]
    cmd = [*command, "--overwrite_output_dir", "True", "--model_name", model,
           "--tokenizer_name", "tiny-llama", "--dataset", "alpaca_dataset",
           "--alpaca_dataset.data_path",
           str(REPO / "llm_finetune" / "assets" / "data" / "tiny_alpaca.json"),
           "--context_length", str(SEQ), "--num_epochs", "50", "--run_validation", "False",
           "--save_model", "False", "--num_workers_dataloader", "2", "--output_dir", str(out),
           *flags]
    log, result = run_ours(cmd, env, out, steps)
    if result is None:
        print(f"ours {flags} failed:\n{log[-3000:]}", flush=True)
    return result


def run_ours(cmd: list[str], env: dict, out: Path, steps: int) -> tuple[str, dict | None]:
    """``steps`` optimizer steps of 4 sequences: ``--max_train_step`` counts micro-batches of
    the batch as given, and the planner scales it when it splits the batch."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([*cmd, "--max_train_step", str(steps)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    (out / "run.log").write_text(log)
    if done.returncode != 0 or not (out / "metrics.jsonl").is_file():
        return log, None
    logged, _ = read_metrics(out)
    chosen = [line for line in log.splitlines()
              if line.startswith(("GPU defaults", "auto_fit:"))]
    tokens = steady_tokens_per_s(logged)
    return log, {"tokens_per_s": tokens, "step_time_s": BATCH * SEQ / tokens,
                 "peak_gpu_mem_gib": max(s["peak_gpu_mem_gib"] or 0 for s in logged),
                 "setting": " ".join(chosen), "steps": len(logged),
                 "losses": [s["loss"] for s in logged]}


def peer_rows(name: str, scenario: PeerScenario, steps: int, work: Path, env: dict,
              unsloth_site: str, unsloth_settings: list[tuple[bool, int]],
              liger_lever: bool) -> list[dict]:
    rows = []

    def add(runner: str, result: dict | None, setting: str = ""):
        rows.append({"scenario": name, "runner": runner, "setting": setting, **(result or {})})
        print(json.dumps(rows[-1]), flush=True)
        return result

    checkpoint = work / f"{scenario.shape}-random"
    if scenario.mode == "qlora" or unsloth_site:  # they load weights from disk
        write_checkpoint(checkpoint, env, scenario.shape)
    model = str(checkpoint) if scenario.mode == "qlora" else scenario.shape
    baseline = [sys.executable, "benchmarks/baseline_hf_peft.py", "--mode", scenario.mode,
                "--model", model, "--batch", str(BATCH), "--seq", str(SEQ), "--steps", str(steps)]
    _, beginner = run_json([*baseline, "--ac", "True"], env)
    add("transformers+peft (beginner)", beginner, "AC, 4 per forward")
    budget = beginner["peak_gpu_mem_gib"] if beginner else 0.0
    log, liger = run_json([*baseline, "--liger", "True", "--search", "1,2,4",
                           "--budget_gib", str(budget)], env)
    if liger is None:
        print(f"liger failed:\n{log[-3000:]}", flush=True)
    add("transformers+peft+liger (searched)", liger,
        liger and f"{'AC' if liger.get('ac') else 'no AC'}, {liger.get('micro_batch')} per "
        f"forward (fastest within the beginner's {budget:.1f} GiB)")
    unsloth = []
    if unsloth_site:
        for ac, micro in unsloth_settings:
            cmd = [sys.executable, "benchmarks/baseline_unsloth.py", "--mode",
                   scenario.mode, "--model", str(checkpoint), "--batch", str(BATCH), "--micro",
                   str(micro), "--seq", str(SEQ), "--steps", str(steps), "--ac", str(ac)]
            log, result = run_json(cmd, {**env, "PYTHONPATH": f"{unsloth_site}:{REPO}"},
                                   timeout=300)
            if result is None:
                print(f"unsloth failed:\n{log[-3000:]}", flush=True)
            unsloth.append(add("Unsloth", result, f"{'its AC' if ac else 'no AC'}, "
                                                  f"{micro} per forward"))
    peers = [r for r in (liger, *unsloth) if r and "tokens_per_s" in r]
    best_peer = max(peers, key=lambda r: r["tokens_per_s"]) if peers else None
    add("llm_finetune, design card flags", ours(model, scenario.our_flags, steps,
                                                work / f"{name}-default", env), "GPU defaults")
    if best_peer:
        cap = best_peer["peak_gpu_mem_gib"]
        # the best peer's LoRA: Unsloth's fused LoRA kernels need dropout 0
        same_lora = (["--lora_config.lora_dropout", "0"]
                     if scenario.mode != "full" and any(best_peer is r for r in unsloth) else [])
        add(*ours_tuned(name, scenario, model, cap, same_lora, steps, work, env))
    if best_peer and liger_lever:
        add("llm_finetune + liger kernels (lever)",
            ours(model, [*scenario.our_flags, *same_lora, *budget_flags(cap)], steps,
                 work / f"{name}-liger", env,
                 launcher=[sys.executable, "benchmarks/with_liger.py"]),
            f"eager layers with liger's RMSNorm/SwiGLU/RoPE, --auto_fit within {cap:.1f} GiB")
    return finish(rows, scenario, best_peer, beginner)


def ours_tuned(name: str, scenario: PeerScenario, model: str, cap: float, same_lora: list,
               steps: int, work: Path, env: dict) -> tuple[str, dict | None, str]:
    """Ours with compiled layers, ``--auto_fit`` within the best peer's ``cap`` GiB."""
    tuned = [*scenario.our_flags, *same_lora, *budget_flags(cap), "--torch_compile", "True"]
    return ("llm_finetune, tuned", ours(model, tuned, steps, work / f"{name}-tuned", env),
            f"compiled layers{', LoRA dropout 0' if same_lora else ''}, --auto_fit within the "
            f"best peer's {cap:.1f} GiB")


def against_recorded(names: list[str], recorded: str, steps: int, work: Path,
                     env: dict) -> list[dict]:
    """Ours tuned only, against best peers measured in an earlier call (``recorded``:
    ``full_1b=58432@16.9,...``, tokens/s at peak GiB, for a planner change that moves only
    ours); the peers' own rows are not re-run."""
    peers = {}
    for item in recorded.split(","):
        key, _, value = item.partition("=")
        speed, _, peak = value.partition("@")
        peers[key] = {"tokens_per_s": float(speed), "peak_gpu_mem_gib": float(peak)}
    missing = [name for name in names if name not in peers]
    if missing:
        raise SystemExit(f"--recorded_peers has no best peer for {', '.join(missing)}")
    rows = []
    for name in names:
        scenario, peer = SCENARIOS[name], peers[name]
        model = scenario.shape
        if scenario.mode == "qlora":  # 4-bit weights quantise as they load from disk
            model = str(work / f"{scenario.shape}-random")
            write_checkpoint(Path(model), env, scenario.shape)
        # the recorded best LoRA peers were Unsloth's, whose fused kernels need dropout 0
        same_lora = ["--lora_config.lora_dropout", "0"] if scenario.mode != "full" else []
        runner, result, setting = ours_tuned(name, scenario, model, peer["peak_gpu_mem_gib"],
                                             same_lora, steps, work, env)
        rows.append({"scenario": name, "runner": runner, "setting": setting, **(result or {})})
        finish(rows[-1:], scenario, peer, None)
        print(json.dumps(rows[-1]), flush=True)
    return rows


def unsloth_settings(text) -> list[tuple[bool, int]]:
    """``ac4,noac1`` -> [(True, 4), (False, 1)]: (checkpointing, sequences per forward)."""
    names = text.split(",") if isinstance(text, str) else list(text)
    return [(name.startswith("ac"), int(name.removeprefix("no").removeprefix("ac")))
            for name in names if name]


def finish(rows: list[dict], scenario: PeerScenario, best_peer: dict | None,
           beginner: dict | None) -> list[dict]:
    """MFU in the field's convention and against the measured matmul rate, and each row's
    speed and memory against the beginner and the best peer."""
    params = PARAMS[scenario.shape]
    per_token = flops_per_token(params, params if scenario.mode == "full" else 0,
                                *LAYERS_HIDDEN[scenario.shape], SEQ)
    for row in rows:
        if "tokens_per_s" not in row:
            continue
        row["mfu"] = row["tokens_per_s"] * per_token / 989e12
        row["mfu_measured"] = row["tokens_per_s"] * per_token / MEASURED_PEAK
        if beginner:
            row["vs_beginner"] = row["tokens_per_s"] / beginner["tokens_per_s"]
        if best_peer:
            row["vs_best_peer"] = row["tokens_per_s"] / best_peer["tokens_per_s"]
            row["memory_vs_best_peer"] = row["peak_gpu_mem_gib"] / best_peer["peak_gpu_mem_gib"]
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| scenario | runner | setting | tokens/s | peak GiB | MFU (989) | MFU (measured) "
          "| vs beginner | vs best peer | memory vs best peer |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"| {r['scenario']} | {r['runner']} | {r['setting']} | failed | | | | | | |")
            continue
        ratios = [f"{r[k]:.2f}x" if k in r else ""
                  for k in ("vs_beginner", "vs_best_peer", "memory_vs_best_peer")]
        print(f"| {r['scenario']} | {r['runner']} | {r['setting']} | {r['tokens_per_s']:,.0f} | "
              f"{r['peak_gpu_mem_gib']:.1f} | {r['mfu']:.0%} | {r['mfu_measured']:.0%} | "
              + " | ".join(ratios) + " |", flush=True)


def main(only: str = "lora_8b,qlora_8b,full_1b", steps: int = 6, out: str = "peers.json",
         workdir: str = "/tmp/peers", unsloth_site: str = "", unsloth: str = "ac4,noac1",
         liger_lever: bool = True, recorded_peers: str = "") -> list[dict]:
    """``unsloth``: Unsloth's settings to run, ``ac4`` (its checkpointing, 4 sequences per
    forward) and ``noacN`` (no checkpointing, N per forward); ``liger_lever``: also ours with
    liger's kernels in place of compiled layers; ``recorded_peers``: run ours tuned only,
    against these earlier best peers (``against_recorded``)."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    names = only.split(",") if isinstance(only, str) else list(only)
    if recorded_peers:
        rows = against_recorded(names, recorded_peers, steps, work, env)
        print_table(rows)
        Path(out).write_text(json.dumps(rows, indent=1))
        return rows
    rows = []
    for name in names:
        rows += peer_rows(name, SCENARIOS[name], steps, work, env, unsloth_site,
                          unsloth_settings(unsloth), liger_lever)
        print_table(rows)
        Path(out).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    fire.Fire(main)
