"""Which settings fit, and which of them is fastest: searches over ``estimate``.

When a run does not fit, the usual fixes are tried one at a time (``planned_fixes``) and, when
none is enough, together (``combined_fix``). When it fits, ``fastest_setting`` picks the
micro-batch and the layers kept out of activation checkpointing with the shortest planned step
(``cost.step_seconds``) that still fit, at the same tokens per optimizer step; ``faster_flags``
says it as flags, and ``--auto_fit`` (``fit_to_gpu``, ``auto_fit``) applies it at launch.
"""

import dataclasses
import os
from dataclasses import dataclass

from llm_finetune.config_utils import ConfigError
from llm_finetune.preflight import validate
from llm_finetune.plan.cost import step_seconds
from llm_finetune.plan.counts import ModelCounts, count_parameters
from llm_finetune.plan.memory import GIB, estimate, gpu_memory_available


def candidate_fixes(run, world_size: int):
    """(description, changed run, world size) for each usual fix that applies."""
    t, f = run.train, run.fsdp

    def changed(**settings):
        new = dataclasses.replace(run, train=dataclasses.replace(t), fsdp=dataclasses.replace(f))
        for key, value in settings.items():
            section, name = key.split(".") if "." in key else ("train", key)
            setattr(getattr(new, section), name, value)
        return new

    if not f.fsdp_activation_checkpointing:
        yield "--fsdp_config.fsdp_activation_checkpointing True", changed(
            **{"fsdp.fsdp_activation_checkpointing": True}), world_size
    if t.use_peft and not t.quantization and not t.enable_fsdp:
        yield "--quantization 4bit (QLoRA)", changed(quantization="4bit"), world_size
    if t.method == "dpo" and not t.use_peft:
        yield ("--use_peft (LoRA; the DPO reference is then the model with its adapters off, "
               "not a copy)", changed(use_peft=True), world_size)
    if t.enable_fsdp and not f.pure_bf16 and not f.use_fp16:
        yield "--fsdp_config.pure_bf16 True", changed(**{"fsdp.pure_bf16": True}), world_size
    for more in (2, 4, 8, 16, 32, 64):
        if more > world_size:
            yield (f"{more} GPUs with --enable_fsdp (FULL_SHARD)",
                   changed(enable_fsdp=True, **{"fsdp.sharding_strategy": "FULL_SHARD",
                                                "fsdp.hsdp": False}), more)
    batch = t.batch_size_training
    while batch > 1:
        batch //= 2
        accumulation = t.gradient_accumulation_steps * t.batch_size_training // batch
        yield (f"--batch_size_training {batch} --gradient_accumulation_steps {accumulation} "
               "(same global batch)",
               changed(batch_size_training=batch, gradient_accumulation_steps=accumulation),
               world_size)
    if t.enable_fsdp and not f.fsdp_cpu_offload:
        yield "--fsdp_config.fsdp_cpu_offload True", changed(
            **{"fsdp.fsdp_cpu_offload": True}), world_size


def planned_fixes(run, world_size: int):
    """(description, run, world size, peak) of each valid single fix."""
    for description, new_run, new_world in candidate_fixes(run, world_size):
        try:
            validate(new_run, new_world, cuda=True)
        except ConfigError:
            continue
        yield (description, new_run, new_world,
               estimate(new_run, new_world, count_parameters(new_run)).gpu_peak)


def combined_fix(run, world_size: int, gpu_memory: float) -> list[str]:
    """No single fix is enough: take the best fix, then the best on top of it, until it fits.
    "Best" is the lowest peak among changes on the same GPUs, and more GPUs only when no such
    change lowers the peak any more."""
    steps, peak = [], estimate(run, world_size).gpu_peak
    for _ in range(4):
        options = [option for option in planned_fixes(run, world_size) if option[3] < peak]
        if not options:
            break
        description, run, new_world, peak = min(
            options, key=lambda option: (option[2] > world_size, option[3]))
        world_size = new_world
        steps.append(description)
        if peak <= gpu_memory:
            return [f"  - together: {' and '.join(steps)}: {peak / GIB:.1f} GiB"]
    return ["  - none of the usual changes: a larger GPU, or more GPUs with CPU offload"]


@dataclass(frozen=True)
class Setting:
    """Sequences per forward and decoder layers kept out of activation checkpointing (all of
    them: checkpointing off), at the same tokens per optimizer step as the run."""
    micro_batch: int
    kept: int


def compute_per_token(run, setting: Setting, num_layers: int) -> float:
    """Forward passes' worth of compute per token: forward 1, backward 2 (input and weight
    gradients; 1 for a frozen base, which needs input gradients only), and each recomputed
    layer's share of a second forward; DPO adds its reference model's forward. Only the ratio
    between settings of one run matters."""
    backward = 1 if run.train.use_peft else 2
    reference = 1 if run.train.method == "dpo" else 0
    return 1 + backward + reference + (num_layers - setting.kept) / num_layers


def setting_seconds(run, setting: Setting, counts: ModelCounts) -> float:
    """The step-time model's seconds per optimizer step of ``run`` at ``setting`` (cost.py)."""
    layers = counts.num_layers
    return step_seconds(run, setting.micro_batch, layers - setting.kept,
                        compute_per_token(run, setting, layers), counts)


def with_setting(run, setting: Setting, num_layers: int):
    """``run`` with ``setting``: the micro-batch (accumulating to the same tokens per optimizer
    step) and the layers left out of checkpointing. ``max_train_step`` counts micro-batches: it
    is scaled to keep the run's optimizer steps."""
    t, f = run.train, run.fsdp
    accumulation = t.gradient_accumulation_steps * t.batch_size_training // setting.micro_batch
    max_train_step = t.max_train_step // t.gradient_accumulation_steps * accumulation
    checkpointing = setting.kept < num_layers
    return dataclasses.replace(
        run, train=dataclasses.replace(t, batch_size_training=setting.micro_batch,
                                       gradient_accumulation_steps=accumulation,
                                       max_train_step=max_train_step),
        fsdp=dataclasses.replace(f, fsdp_activation_checkpointing=checkpointing,
                                 no_checkpoint_layers=setting.kept if checkpointing else 0))


def current_setting(run, counts: ModelCounts) -> Setting:
    layers = counts.num_layers
    kept = (layers if not run.fsdp.fsdp_activation_checkpointing
            else min(run.fsdp.no_checkpoint_layers, layers))
    return Setting(run.train.batch_size_training, kept)


def fastest_setting(run, world_size: int, gpu_memory: float,
                    counts: ModelCounts) -> Setting | None:
    """The micro-batch and selective checkpointing with the shortest planned step (cost.py)
    whose planned peak fits in ``gpu_memory``; None when nothing fits.

    Each layer not recomputed saves a share of a forward pass. On one GPU the micro-batch may
    shrink too, for the same tokens per optimizer step: more accumulation steps give the same
    gradient (the loss is a sum over every token of the step) and leave room for more layers'
    activations, but a small micro-batch may leave the GPU waiting for the host, and each one
    dequantises 4-bit weights again, which the step-time model counts; among settings within
    3% of the shortest step the largest micro-batch wins.
    Under FSDP or DDP the micro-batch stays: each one gathers every weight and reduces every
    gradient again, which costs more than the recompute it saves (measured: docs/performance.md,
    docs/fsdp.md)."""
    t = run.train
    layers = counts.num_layers
    communicates = world_size > 1 and (t.enable_fsdp or t.enable_ddp)
    micro_batches = ([t.batch_size_training] if communicates else
                     [m for m in range(t.batch_size_training, 0, -1)
                      if t.batch_size_training % m == 0])
    lowest = 0 if counts.supports_checkpointing else layers
    choices = []  # per micro-batch, the most layers kept that fit
    for micro in micro_batches:
        fitting = [kept for kept in range(lowest, layers + 1)
                   if estimate(with_setting(run, Setting(micro, kept), layers), world_size,
                               counts).gpu_peak <= gpu_memory]
        if fitting:
            choices.append(Setting(micro, max(fitting)))
    if not choices:
        return None

    def seconds(setting: Setting) -> float:
        return setting_seconds(run, setting, counts)

    least = min(map(seconds, choices))
    return min((c for c in choices if seconds(c) <= 1.03 * least),
               key=lambda c: (-c.micro_batch, seconds(c)))


def setting_flags(run, setting: Setting, counts: ModelCounts) -> str:
    """``setting`` as the flags that give it, with what it changes."""
    t = run.train
    layers = counts.num_layers
    flags = []
    if setting.micro_batch != t.batch_size_training:
        accumulation = t.gradient_accumulation_steps * t.batch_size_training // setting.micro_batch
        flags.append(f"--batch_size_training {setting.micro_batch} "
                     f"--gradient_accumulation_steps {accumulation}")
        if t.max_train_step:  # it counts micro-batches: the same optimizer steps
            flags.append(f"--max_train_step "
                         f"{t.max_train_step // t.gradient_accumulation_steps * accumulation}")
    if setting.kept == layers:
        flags.append("--fsdp_config.fsdp_activation_checkpointing False")
        recompute = "no recompute"
    else:
        flags.append(f"--fsdp_config.no_checkpoint_layers {setting.kept}")
        recompute = f"recompute {layers - setting.kept} of {layers} layers"
    same = (f"; the same {t.batch_size_training * t.gradient_accumulation_steps} sequences per "
            "optimizer step" if setting.micro_batch != t.batch_size_training else "")
    now, then = (setting_seconds(run, s, counts) for s in (current_setting(run, counts), setting))
    return (f"{' '.join(flags)} ({recompute}{same}: a planned {1 - then / now:.0%} less time "
            f"per optimizer step, {then:.3g} s)")


def faster_flags(run, world_size: int, gpu_memory: float, counts: ModelCounts) -> str:
    """The fastest setting as flags, or "" when the run's own setting is already that."""
    best = fastest_setting(run, world_size, gpu_memory, counts)
    now = current_setting(run, counts)
    if best is None or (best.micro_batch == now.micro_batch and best.kept <= now.kept):
        return ""
    return setting_flags(run, best, counts)


# the planner's peaks were within 10% of measured ones (docs/memory.md): --auto_fit plans for
# this share of the GPU
AUTO_FIT_SHARE = 0.9


def fit_to_gpu(run, world_size: int, cuda: bool):
    """``--auto_fit``: ``run`` with the fastest micro-batch and checkpointing that fit in
    ``AUTO_FIT_SHARE`` of the GPU's memory (``--gpu_memory``, else the GPU's own), at the same
    tokens per optimizer step; a ConfigError when none fits. Every rank computes the same
    choice; the first prints it."""
    gpu_memory = gpu_memory_available(run.train.gpu_memory)
    if gpu_memory is None:
        raise ConfigError("--auto_fit plans for a GPU's memory and none was found: give "
                          "--gpu_memory (e.g. 80GiB) or drop --auto_fit")
    fitted = auto_fit(run, world_size, gpu_memory, verbose=os.environ.get("RANK", "0") == "0")
    validate(fitted, world_size, cuda)
    return fitted


def auto_fit(run, world_size: int, gpu_memory: float, verbose: bool = True):
    """``run`` with the fastest micro-batch and checkpointing that fit in ``AUTO_FIT_SHARE``
    of ``gpu_memory``, the same tokens per optimizer step."""
    counts = count_parameters(run)
    budget = AUTO_FIT_SHARE * gpu_memory
    best = fastest_setting(run, world_size, budget, counts)
    if best is None:
        smallest = "one sequence per forward and" if world_size == 1 else ""
        raise ConfigError(
            f"--auto_fit: this run does not fit in {budget / GIB:.1f} GiB "
            f"({AUTO_FIT_SHARE:.0%} of {gpu_memory / GIB:.1f}) even with {smallest} every layer "
            "recomputed; python -m llm_finetune.plan with the same settings lists the changes "
            "that fit (4-bit, more GPUs, CPU offload, a shorter context)")
    fitted, change = apply_setting(run, best, counts, world_size, gpu_memory)
    if verbose:
        print(f"auto_fit: {change}", flush=True)
    return fitted


def apply_setting(run, setting: Setting, counts: ModelCounts, world_size: int,
                  gpu_memory: float) -> tuple:
    """(``run`` at ``setting``, what that changes and its planned peak out of ``gpu_memory``):
    what ``--auto_fit`` and a GPU's defaults print."""
    fitted = with_setting(run, setting, counts.num_layers)
    change = ("the run's own micro-batch and checkpointing"
              if setting == current_setting(run, counts) else setting_flags(run, setting, counts))
    peak = estimate(fitted, world_size, counts).gpu_peak
    return fitted, f"{change}, planned {peak / GIB:.1f} of {gpu_memory / GIB:.1f} GiB"
