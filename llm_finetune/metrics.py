"""``output_dir/metrics.jsonl``: one JSON object per optimizer step and per evaluation, appended
and flushed as the run goes, so scripts can read it while training runs. Keys are stable:
steps have step, epoch, loss, lr, tokens_per_s, data_wait_s, peak_gpu_mem_gib; evaluations
have step, eval_loss, eval_perplexity; an objective's own metrics join both (DPO's rewards, and
no perplexity); benchmark scores (``python -m llm_finetune.evaluate``) have step, scores,
stderr, samples and the settings they were taken with. A step's tokens/s counts the time spent
waiting for its batches (``data_wait_s``), which is time the GPU stands idle."""

import json
import os
import statistics
import time
from pathlib import Path

import torch

from llm_finetune.quantization import is_4bit


class MetricsLog:
    def __init__(self, path: str, enabled: bool, resumed_step: int | None = None,
                 trackers=None):
        """``resumed_step``: this run resumes a checkpoint of that step, and continues the file
        of the run it resumes: records up to that step are kept, later ones (written by the
        stopped run after its last checkpoint, and written again now) dropped, so the file
        stays one curve. ``trackers`` (``trackers.Trackers``) get every record too."""
        self.path = path
        self.trackers = trackers
        self.enabled = enabled
        self.records: list[dict] = []  # this process's records: main() returns them
        if not enabled:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        kept = []
        if resumed_step is not None and os.path.exists(path):
            kept = [record for record in read_records(Path(path))
                    if record.get("step", 0) <= resumed_step]
        with open(path, "w") as f:
            f.writelines(json.dumps(record) + "\n" for record in kept)

    def log(self, record: dict) -> None:
        self.records.append(record)
        if self.trackers is not None:
            self.trackers.log(record)
        if self.enabled:
            append_record(self.path, record)


def append_record(path: str | Path, record: dict) -> None:
    """One line at the end of a metrics.jsonl (the trainer's and ``evaluate``'s only writer)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A run killed while appending leaves a half-written last
    line: it is dropped, with a warning (the step it described is run again on resume); a bad
    line elsewhere is an error naming the file and line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not JSON ({error}): repair or remove "
                                 "that line") from error
            print(f"warning: {path}: dropped its half-written last line {line[:80]!r} (a run "
                  "stopped while writing it)", flush=True)
    return records


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(optimizer-step records, evaluation records) of a run directory."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no metrics.jsonl (was the run started with "
                         "--save_metrics False?)")
    records = read_records(path)
    return ([r for r in records if "loss" in r], [r for r in records if "eval_loss" in r])


def read_scores(run_dir: Path) -> list[dict]:
    """The benchmark-score records of a run directory (none: an empty list)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in read_records(path) if "scores" in r] if path.is_file() else []


def steady_median(steps: list[dict], key: str) -> float:
    """Median of a step record's ``key`` over steps 3 and later: the first steps pay for
    warm-up (allocator growth, kernel selection, compilation, loader workers starting)."""
    return statistics.median(s[key] for s in steps[2:] or steps)


def steady_tokens_per_s(steps: list[dict]) -> float:
    """The run's speed, without its warm-up steps."""
    return steady_median(steps, "tokens_per_s")


class PhaseTimer:
    """Wall time of each phase of a run (load, shard, data, train, save), printed on rank 0 as
    each ends, so a slow or stuck phase (an 8B model loading on one CPU thread, say) shows in
    the log while the run goes, and the run summary keeps them."""

    def __init__(self, verbose: bool):
        self.verbose = verbose
        self.seconds: dict[str, float] = {}
        self.last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(now - self.last, 2)
        self.last = now
        if self.verbose:
            print(f"[{phase}] done in {self.seconds[phase]:.1f} s", flush=True)


# Dense bf16 peak per GPU, the datasheet's: the field's MFU convention (torchtitan and most
# published tables divide by 989 TFLOP/s on H100/H200 SXM)
DATASHEET_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# the bf16 matmul rate measured on the project's H100/H200s (docs/performance.md): MFU against
# it shows the distance to what the chip really does
MEASURED_BF16_FLOPS = {"H100": 790e12, "H200": 790e12, "A100": 312e12}


def flops_per_token(total_params: int, trainable_params: int, num_layers: int,
                    hidden_size: int, attention_length: float) -> float:
    """Model FLOPs of one trained token, torchtitan's way: 2 x parameters forward, 2 x backward
    through the activations, 2 x trainable parameters for weight gradients (6 x parameters for
    full fine-tuning), plus attention's score and value matmuls, 12 x layers x hidden x the
    sequence length the token attends over (forward and backward, causal mask not halved).
    Recompute is not counted: it is work, not model FLOPs."""
    attention = 12 * num_layers * hidden_size * attention_length
    return 4 * total_params + 2 * trainable_params + attention


def model_flops_utilization(tokens_per_s: float, flops_per_trained_token: float,
                            world_size: int) -> dict:
    """``mfu``: model FLOPs per second over the datasheet bf16 peak of the GPUs (the field's
    convention); ``mfu_of_measured_peak``: over the measured matmul rate. None off known GPUs."""
    gpu = None
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        gpu = next((gpu for gpu in DATASHEET_BF16_FLOPS if gpu in name), None)
    if gpu is None:
        return {"mfu": None, "mfu_of_measured_peak": None}
    achieved = tokens_per_s * flops_per_trained_token / world_size
    return {"mfu": achieved / DATASHEET_BF16_FLOPS[gpu],
            "mfu_of_measured_peak": achieved / MEASURED_BF16_FLOPS[gpu]}


def report_parameter_counts(model, dist_info) -> tuple[int, int]:
    """Print on rank 0 and return (total, trainable) parameters of the model as this rank holds
    it. Under FSDP each rank holds a shard: the local counts are scaled back to the model's size
    (approximate: padding). The planner's exact counts come from a meta model:
    ``plan.count_parameters``."""
    total = sum(parameter_count(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    scale = dist_info.world_size if hasattr(model, "sharding_strategy") and \
        model.sharding_strategy.name != "NO_SHARD" else 1
    total, trainable = total * scale, trainable * scale
    if dist_info.is_main:
        approx = " (approx.: scaled up from this rank's FSDP shard)" if scale > 1 else ""
        print(f"parameters: {total / 1e6:.2f}M, trainable {trainable / 1e6:.2f}M{approx}, "
              f"world size {dist_info.world_size}, device {dist_info.device}", flush=True)
    return total, trainable


def parameter_count(param: torch.Tensor) -> int:
    """Model parameters a tensor holds: a packed 4-bit weight holds two per byte of storage."""
    if is_4bit(param) and param.bnb_quantized:
        return param.numel() * param.element_size() * 2
    return param.numel()
