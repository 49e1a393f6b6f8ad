"""The planner's step-time model (llm_finetune/plan/cost.py) against measured step times:
prints predicted and measured tokens/s for each run in ``--points`` (benchmarks/results/
step_times.json: what benchmarks/peers.py and benchmarks/cost_points.py measured, with the
date, GPU and command), and the error. ``--fit_rates``: the rates fitted to the runs marked ``fit``
(least squares on log step time; needs scipy), printed, then the table with them: the runs not
marked ``fit`` check the model on data it did not see.

    python benchmarks/cost_model_check.py
    python benchmarks/cost_model_check.py --fit_rates True
"""

import dataclasses
import json
import math
from pathlib import Path

import fire

from llm_finetune.config_utils import build_run_config
from llm_finetune.plan import count_parameters
from llm_finetune.plan.cost import HOPPER, GpuSpeed, step_seconds
from llm_finetune.plan.search import Setting, compute_per_token

POINTS = Path(__file__).resolve().parent / "results" / "step_times.json"
MODES = {"full": {"fsdp_config.pure_bf16": True}, "lora": {"use_peft": True},
         "qlora": {"use_peft": True, "quantization": "4bit"}}
BATCH, SEQUENCE = 4, 2048


def predicted_tokens_per_s(point: dict, speed: GpuSpeed, counts_cache: dict) -> float:
    run = build_run_config(model_name=point["shape"], context_length=SEQUENCE,
                           batch_size_training=BATCH, torch_compile=point["compiled"],
                           **MODES[point["mode"]])
    key = (point["shape"], point["mode"])
    if key not in counts_cache:
        counts_cache[key] = count_parameters(run)
    counts = counts_cache[key]
    layers = counts.num_layers
    work = compute_per_token(run, Setting(point["micro_batch"], layers - point["recomputed"]),
                             layers)
    seconds = step_seconds(run, point["micro_batch"], point["recomputed"], work, counts, speed)
    return BATCH * SEQUENCE / seconds


def table(points: list[dict], speed: GpuSpeed, cache: dict) -> None:
    print("| model | mode | micro-batch | layers recomputed | layers | measured tokens/s | "
          "predicted | error | fitted on | source |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- | --- |")
    errors = {True: [], False: []}
    for p in points:
        predicted = predicted_tokens_per_s(p, speed, cache)
        error = predicted / p["tokens_per_s"] - 1
        errors[p["fit"]].append(abs(error))
        print(f"| {p['shape']} | {p['mode']} | {p['micro_batch']} | {p['recomputed']} | "
              f"{'compiled' if p['compiled'] else 'eager'} | {p['tokens_per_s']:,} | "
              f"{predicted:,.0f} | {error:+.1%} | {'yes' if p['fit'] else 'no'} | "
              f"{p['source']} |")
    for fitted, values in errors.items():
        if values:
            print(f"{'fitted' if fitted else 'held-out'} runs: mean |error| "
                  f"{sum(values) / len(values):.1%}, largest {max(values):.1%}")


def fit(points: list[dict], cache: dict) -> GpuSpeed:
    from scipy.optimize import minimize

    names = ["eager_flops", "compiled_flops", "layer_host_s", "layer_host_4bit_compiled_s"]
    fitted = [p for p in points if p["fit"]]

    def speed_of(logs) -> GpuSpeed:
        return dataclasses.replace(HOPPER, **dict(zip(names, map(math.exp, logs))))

    def loss(logs) -> float:
        speed = speed_of(logs)
        return sum(math.log(predicted_tokens_per_s(p, speed, cache) / p["tokens_per_s"]) ** 2
                   for p in fitted)

    start = [math.log(getattr(HOPPER, name)) for name in names]
    best = minimize(loss, start, method="Nelder-Mead",
                    options={"xatol": 1e-4, "fatol": 1e-8, "maxiter": 4000})
    speed = speed_of(best.x)
    print("fitted:", {name: f"{getattr(speed, name):.3g}" for name in names})
    return speed


def main(points: str = str(POINTS), fit_rates: bool = False) -> None:
    rows = json.loads(Path(points).read_text())
    cache: dict = {}
    table(rows, fit(rows, cache) if fit_rates else HOPPER, cache)


if __name__ == "__main__":
    fire.Fire(main)
