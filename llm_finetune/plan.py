"""Will this run fit? Per-GPU and per-rank CPU memory of a run, before launching it.

    python -m llm_finetune.plan --model_name llama3-8b --use_peft --world_size 2 --gpu_memory 80GiB
    python -m llm_finetune.finetuning --dry_run ...        # the same table, then exit

Takes the same settings as ``finetuning``. Parameter counts are exact: the model is built on the
meta device from its config (no weights read, no memory used) with the run's adapters applied.
Activations and logits follow a per-token model of a Llama-style decoder layer, checked against
``torch.cuda.max_memory_allocated`` of real runs on H100/H200 (docs/memory.md). When the run
does not fit, the planner tries the usual fixes one at a time and lists those that would fit.
"""

import dataclasses
import os
import re
import sys
from dataclasses import dataclass, field

import fire
import torch

from llm_finetune.adapters import apply_peft
from llm_finetune.config_utils import ConfigError, build_run_config, hybrid_mesh_shape, validate
from llm_finetune.distributed import world_size_from_env
from llm_finetune.model import (decoder_layers, init_after_adapters, quantized_at_load, meta_model, model_config,
                                weights_on_disk)
from llm_finetune.loss import CHUNK_TOKENS
from llm_finetune.precision import choose_precision

GIB = 2**30
# what the CUDA caching allocator, cuBLAS/attention workspaces and NCCL add beyond the tensors
WORKSPACE_BYTES = 0.35 * GIB


@dataclass
class ModelCounts:
    """Parameter counts of the model as the run will train it."""
    total: int
    trainable: int
    quantizable: int  # frozen nn.Linear weights inside decoder layers (what bitsandbytes packs)
    largest_layer: int  # parameters of one decoder layer (an FSDP unit)
    outside_layers: int  # embeddings, final norm, lm_head (FSDP's root unit)
    num_layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    supports_checkpointing: bool


@dataclass
class Plan:
    gpu: dict[str, float] = field(default_factory=dict)  # bytes per GPU, by component
    cpu: dict[str, float] = field(default_factory=dict)  # bytes per rank in CPU RAM
    notes: list[str] = field(default_factory=list)
    gpu_loading: float = 0.0  # bytes per GPU while loading, before FSDP shards (QLoRA)
    # Two moments of a step hold different things: at the end of forward, the activations and
    # the loss, but no gradients yet (set to None after the last optimizer step, unless
    # accumulation keeps them); at the end of backward, every gradient, but only the layer
    # being recomputed. The peak is the larger of the two.
    forward_only: set[str] = field(default_factory=set)  # keys of ``gpu`` freed by backward
    backward_only: set[str] = field(default_factory=set)  # keys that backward creates
    backward_activations: float = 0.0  # one layer's activations, recomputed in backward

    @property
    def forward_end(self) -> float:
        return sum(v for k, v in self.gpu.items() if k not in self.backward_only)

    @property
    def backward_end(self) -> float:
        return (sum(v for k, v in self.gpu.items() if k not in self.forward_only)
                + self.backward_activations)

    @property
    def gpu_peak(self) -> float:
        return max(self.forward_end, self.backward_end, self.gpu_loading)


def count_parameters(run) -> ModelCounts:
    """Exact counts from the model built on the meta device, with the run's adapters (the
    run's own printout, ``finetuning.report_parameter_counts``, scales a rank's shard)."""
    config = model_config(run.train.model_name)
    model = meta_model(config, torch.float32, "sdpa")
    layers = decoder_layers(model)
    supports_checkpointing = model.supports_gradient_checkpointing
    if run.train.use_peft:
        model = apply_peft(model, run, len(layers))
    else:
        model.requires_grad_(True)
    unique = {id(p): p for p in model.parameters()}.values()
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    quantizable = sum(m.weight.numel() for layer in layers for m in layer.modules()
                      if type(m) is torch.nn.Linear and not m.weight.requires_grad)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelCounts(
        total=sum(p.numel() for p in unique),
        trainable=sum(p.numel() for p in unique if p.requires_grad),
        quantizable=quantizable,
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        outside_layers=sum(p.numel() for p in unique if id(p) not in in_layers),
        num_layers=len(layers),
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        kv_dim=getattr(text, "num_key_value_heads", heads) * head_dim,
        vocab=text.vocab_size,
        supports_checkpointing=supports_checkpointing)


def shard_group(run, world_size: int) -> int:
    """How many ranks share one copy of the parameters, gradients and optimizer states."""
    if not run.train.enable_fsdp:
        return 1
    strategy = "HYBRID_SHARD" if run.fsdp.hsdp else run.fsdp.sharding_strategy
    if strategy == "NO_SHARD":
        return 1
    if strategy == "HYBRID_SHARD":
        return hybrid_mesh_shape(run.fsdp, world_size)[0]
    return world_size


def quantized_bytes_per_param(run) -> float:
    """bitsandbytes storage: 4-bit NF4/FP4 packs two weights per byte plus one fp32 absmax per
    64 weights (double quant: an 8-bit absmax plus an fp32 one per 256 of those); 8-bit stores
    one byte per weight plus fp32 row statistics."""
    if run.train.quantization == "8bit":
        return 1.0 + 4 / 4096
    absmax = (1 + 4 / 256) / 64 if run.quantization.use_double_quant else 4 / 64
    return 0.5 + absmax


# torch.compile's partitioner recomputes cheap elementwise results (norms, SiLU, the rotary
# copies) in backward instead of keeping them; the share of eager's activations they keep is
# measured by benchmarks/layer_activations.py (figures in docs/memory.md)
COMPILED_ACTIVATIONS = 0.73


def activation_bytes_per_token_per_layer(counts: ModelCounts, compute_bytes: int,
                                         frozen_base: bool = False,
                                         compiled: bool = False) -> float:
    """Tensors a Llama-style decoder layer keeps for backward, per token: about ten hidden-size
    vectors (norm inputs and outputs, q and its rotated copy, attention output, residuals), four
    of the key/value width (k, v and their rotated or repeated copies) and four of the MLP width
    (gate, up, activation, product). A frozen linear layer needs no input for its gradient, so
    with a frozen base (LoRA, QLoRA) the inputs of the output and down projections go: one
    hidden and one MLP vector fewer. Measured on Llama-3-8B in bf16
    (benchmarks/layer_activations.py): 201 KB per token and layer for full fine-tuning, 164 KB
    for LoRA; this gives 205 and 168."""
    vectors = 10 * counts.hidden + 4 * counts.kv_dim + 4 * counts.intermediate
    if frozen_base:
        vectors -= counts.hidden + counts.intermediate
    return compute_bytes * vectors * (COMPILED_ACTIVATIONS if compiled else 1.0)


def estimate(run, world_size: int, counts: ModelCounts | None = None,
             local_world_size: int | None = None) -> Plan:
    """Peak memory per GPU and per rank's CPU RAM of ``run`` on ``world_size`` GPUs."""
    counts = counts or count_parameters(run)
    t, f = run.train, run.fsdp
    local_world_size = local_world_size or min(world_size, 8)
    precision = choose_precision(run, cuda=True, bf16_supported=True)
    weight_bytes = precision.weight_dtype.itemsize
    compute_bytes = precision.compute_dtype.itemsize
    adapter_bytes = precision.trainable_dtype.itemsize
    shards = shard_group(run, world_size)
    offload = t.enable_fsdp and f.fsdp_cpu_offload
    plan = Plan()

    frozen = counts.total - counts.trainable
    quantized = counts.quantizable if t.quantization else 0
    weights = ((frozen - quantized) * weight_bytes + quantized * quantized_bytes_per_param(run)
               + counts.trainable * adapter_bytes)
    grads = counts.trainable * adapter_bytes
    optimizer = 2 * counts.trainable * adapter_bytes  # AdamW: two moments per trainable weight
    if t.enable_fsdp and quantized_at_load(t):
        # every rank loads the whole quantised model onto its GPU, then FSDP keeps its shard
        # (under low_cpu_fsdp, and for random-init models, FSDP quantises unit by unit instead)
        plan.gpu_loading = weights + WORKSPACE_BYTES
    states = {"weights": weights / shards, "gradients": grads / shards,
              "optimizer states (AdamW)": optimizer / shards}
    if t.gradient_accumulation_steps == 1:
        plan.backward_only.add("gradients")
    if offload:
        plan.cpu.update({f"{k} (CPU offload)": v for k, v in states.items()})
        plan.gpu["weights (CPU offload: none resident)"] = 0.0
    else:
        plan.gpu.update(states)
    if t.enable_ddp:  # DDP all-reduces gradients through buckets that copy them
        plan.gpu["DDP gradient buckets"] = grads
        plan.backward_only.add("DDP gradient buckets")
    if t.enable_fsdp and (shards > 1 or offload or compute_bytes != weight_bytes):
        # FSDP1 keeps the root unit (embeddings, lm_head) gathered from forward to backward, and
        # gathers at most two decoder layers ahead (prefetch); mixed precision casts them too
        layer_bytes = quantized_bytes_per_param(run) if t.quantization else compute_bytes
        gathered = counts.outside_layers * compute_bytes + 2 * counts.largest_layer * layer_bytes
        gathered += counts.largest_layer * 4 if counts.trainable else 0  # unsharded fp32 grads
        plan.gpu["gathered FSDP units (root + 2 layers)"] = gathered

    tokens = t.batch_size_training * t.context_length
    per_layer = tokens * activation_bytes_per_token_per_layer(
        counts, compute_bytes, frozen_base=t.use_peft, compiled=t.torch_compile)
    if f.fsdp_activation_checkpointing:
        kept = min(f.no_checkpoint_layers, counts.num_layers)
        checkpointed = counts.num_layers - kept
        # at the end of forward: the checkpointed layers' inputs and the kept layers' activations
        # (a checkpointed layer's own activations exist again only while backward recomputes it)
        activations = (f"activations (checkpointed: {checkpointed} layer inputs"
                       + (f"; {kept} layers kept)" if kept else ")"))
        plan.gpu[activations] = (
            checkpointed * tokens * counts.hidden * compute_bytes + kept * per_layer)
    else:
        activations = "activations (all layers)"
        plan.gpu[activations] = counts.num_layers * per_layer
    if t.chunked_loss:
        # one chunk's fp32 logits and their gradient in the compute dtype (the fp32 copy is
        # freed before the matmuls), plus the saved gradients: of the hidden states, and of
        # the output weight (an fp32 sum and one chunk's term) when it trains
        chunk = min(tokens, CHUNK_TOKENS)
        head_trains = not t.use_peft
        loss = "loss (chunked: one chunk of logits)"
        plan.gpu[loss] = (
            chunk * counts.vocab * (4 + compute_bytes) + tokens * counts.hidden * compute_bytes
            + (counts.vocab * counts.hidden * (4 + compute_bytes) if head_trains else 0))
    else:
        # logits in the compute dtype, their fp32 copy for the loss, and the fp32 log-softmax
        # that cross-entropy keeps for backward: the largest single item for 128k vocabularies
        loss = "logits and loss"
        plan.gpu[loss] = tokens * counts.vocab * (compute_bytes + 10)
    plan.forward_only |= {activations, loss}
    plan.backward_activations = per_layer
    plan.gpu["workspace (allocator, cuBLAS, NCCL)"] = WORKSPACE_BYTES

    # CPU RAM per rank while loading
    full_model = counts.total * weight_bytes
    if init_after_adapters(t) or quantized_at_load(t):
        plan.cpu["loading"] = 0.0  # built on meta / quantised onto the GPU as it loads
    elif t.low_cpu_fsdp:
        plan.cpu["loading (rank 0 only; other ranks ~0)"] = full_model
    else:
        plan.cpu["loading (every rank)"] = full_model
    notes(plan, run, counts, world_size, local_world_size, full_model, weights_on_disk(t))
    return plan


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def notes(plan: Plan, run, counts: ModelCounts, world_size: int, local_world_size: int,
          full_model: float, on_disk: bool) -> None:
    """The traps users hit, said before the launch."""
    t, f = run.train, run.fsdp
    if (t.enable_fsdp and not t.low_cpu_fsdp and on_disk and not t.quantization
            and local_world_size * full_model > 0.8 * host_memory()):
        plan.notes.append(
            f"every one of {local_world_size} ranks per node loads the whole model "
            f"({full_model / GIB:.1f} GiB each, {local_world_size * full_model / GIB:.0f} GiB "
            f"together) into {host_memory() / GIB:.0f} GiB of RAM: the loader would be "
            "SIGKILLed. Add --low_cpu_fsdp (rank 0 alone reads the weights)")
    if f.fsdp_activation_checkpointing and not counts.supports_checkpointing:
        plan.notes.append("this model does not support activation checkpointing: set "
                          "--fsdp_config.fsdp_activation_checkpointing False and plan for all "
                          "activations")
    if f.fsdp_activation_checkpointing:
        plan.notes.append("activation checkpointing is non-reentrant and the model trains in "
                          "train mode (transformers skips checkpointing in eval mode, the mode "
                          "from_pretrained returns), so it is really on; PEFT needs no "
                          "enable_input_require_grads")
    if t.batching_strategy == "padding":
        plan.notes.append("padding batches are planned at the full context_length; shorter "
                          "batches need less")


def parse_bytes(text) -> float:
    """``80GiB``, ``80GB``, ``141G`` or a number of GiB."""
    if isinstance(text, (int, float)):
        return float(text) * GIB
    match = re.fullmatch(r"\s*([\d.]+)\s*(GiB|GB|G|MiB|MB|M)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"--gpu_memory {text!r}: give a size such as 80GiB or 141GB")
    unit = (match.group(2) or "GiB").lower()
    scale = {"gib": GIB, "g": GIB, "gb": 1e9, "mib": 2**20, "m": 2**20, "mb": 1e6}[unit]
    return float(match.group(1)) * scale


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
    layer's share of a second forward. Only the ratio between settings of one run matters."""
    backward = 1 if run.train.use_peft else 2
    return 1 + backward + (num_layers - setting.kept) / num_layers


def with_setting(run, setting: Setting, num_layers: int):
    """``run`` with ``setting``: the micro-batch (accumulating to the same tokens per optimizer
    step) and the layers left out of checkpointing."""
    t, f = run.train, run.fsdp
    accumulation = t.gradient_accumulation_steps * t.batch_size_training // setting.micro_batch
    checkpointing = setting.kept < num_layers
    return dataclasses.replace(
        run, train=dataclasses.replace(t, batch_size_training=setting.micro_batch,
                                       gradient_accumulation_steps=accumulation),
        fsdp=dataclasses.replace(f, fsdp_activation_checkpointing=checkpointing,
                                 no_checkpoint_layers=setting.kept if checkpointing else 0))


def current_setting(run, counts: ModelCounts) -> Setting:
    layers = counts.num_layers
    kept = (layers if not run.fsdp.fsdp_activation_checkpointing
            else min(run.fsdp.no_checkpoint_layers, layers))
    return Setting(run.train.batch_size_training, kept)


def fastest_setting(run, world_size: int, gpu_memory: float,
                    counts: ModelCounts) -> Setting | None:
    """The micro-batch and selective checkpointing with the least compute per token whose
    planned peak fits in ``gpu_memory``; None when nothing fits.

    Each layer not recomputed saves a share of a forward pass. On one GPU the micro-batch may
    shrink too, for the same tokens per optimizer step: more accumulation steps give the same
    gradient (the loss is a sum over every token of the step) and leave room for more layers'
    activations; among settings within 3% of the least compute the largest micro-batch wins.
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

    def compute(setting: Setting) -> float:
        return compute_per_token(run, setting, layers)

    least = min(map(compute, choices))
    return min((c for c in choices if compute(c) <= 1.03 * least),
               key=lambda c: (compute(c), -c.micro_batch))


def setting_flags(run, setting: Setting, counts: ModelCounts) -> str:
    """``setting`` as the flags that give it, with what it changes."""
    t = run.train
    layers = counts.num_layers
    flags = []
    if setting.micro_batch != t.batch_size_training:
        accumulation = t.gradient_accumulation_steps * t.batch_size_training // setting.micro_batch
        flags.append(f"--batch_size_training {setting.micro_batch} "
                     f"--gradient_accumulation_steps {accumulation}")
    if setting.kept == layers:
        flags.append("--fsdp_config.fsdp_activation_checkpointing False")
        recompute = "no recompute"
    else:
        flags.append(f"--fsdp_config.no_checkpoint_layers {setting.kept}")
        recompute = f"recompute {layers - setting.kept} of {layers} layers"
    same = (f"; the same {t.batch_size_training * t.gradient_accumulation_steps} sequences per "
            "optimizer step" if setting.micro_batch != t.batch_size_training else "")
    saved = 1 - (compute_per_token(run, setting, layers)
                 / compute_per_token(run, current_setting(run, counts), layers))
    return f"{' '.join(flags)} ({recompute}{same}: {saved:.0%} less compute per token)"


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
    fitted = with_setting(run, best, counts.num_layers)
    if verbose:
        change = ("the run's own micro-batch and checkpointing"
                  if best == current_setting(run, counts) else setting_flags(run, best, counts))
        peak = estimate(fitted, world_size, counts).gpu_peak
        print(f"auto_fit: {change}, planned {peak / GIB:.1f} of {gpu_memory / GIB:.1f} GiB",
              flush=True)
    return fitted


def report(run, world_size: int, gpu_memory: float | None, counts: ModelCounts) -> str:
    plan = estimate(run, world_size, counts)
    t = run.train
    lines = [f"memory plan: {t.model_name}, {counts.total / 1e9:.2f}B parameters "
             f"({counts.trainable / 1e6:.1f}M trainable), {world_size} GPU(s), "
             f"batch {t.batch_size_training} x {t.context_length} tokens per GPU",
             "", "| per GPU | GiB |", "| --- | ---: |"]
    lines += [f"| {name} | {value / GIB:.2f} |" for name, value in plan.gpu.items()]
    if plan.gpu_loading:
        lines.append(f"| while loading (whole 4-bit model on each GPU, before sharding) | "
                     f"{plan.gpu_loading / GIB:.2f} |")
    lines.append(f"| end of forward (no gradients yet) | {plan.forward_end / GIB:.2f} |")
    lines.append(f"| end of backward (one layer's activations) | {plan.backward_end / GIB:.2f} |")
    lines.append(f"| **peak** | **{plan.gpu_peak / GIB:.2f}** |")
    lines += ["", "| CPU RAM per rank | GiB |", "| --- | ---: |"]
    lines += [f"| {name} | {value / GIB:.2f} |" for name, value in plan.cpu.items()]
    if gpu_memory is None:
        lines.append("\nno GPU found and no --gpu_memory given: cannot say whether it fits")
    elif plan.gpu_peak <= gpu_memory:
        lines.append(f"\nfits: {plan.gpu_peak / GIB:.1f} of {gpu_memory / GIB:.1f} GiB per GPU")
        # under --auto_fit the run already has the fastest setting (for 90% of the memory)
        faster = "" if t.auto_fit else faster_flags(run, world_size, gpu_memory, counts)
        if faster:
            lines.append(f"fastest within the same memory: {faster}")
        if not t.torch_compile and t.batching_strategy == "packing":
            # compiled layers run faster and keep about a quarter less activation memory
            compiled_run = dataclasses.replace(
                run, train=dataclasses.replace(t, torch_compile=True))
            compiled = "" if t.auto_fit else faster_flags(compiled_run, world_size, gpu_memory,
                                                          counts)
            lines.append("faster still: add --torch_compile True (compiled layers" + (
                f"; their smaller activations fit {compiled})" if compiled and compiled != faster
                else ")"))
    else:
        lines.append(f"\ndoes NOT fit: {plan.gpu_peak / GIB:.1f} GiB needed per GPU, "
                     f"{gpu_memory / GIB:.1f} GiB available. Changes that would fit:")
        fixes = [f"  - {description}: {peak / GIB:.1f} GiB"
                 for description, _, _, peak in planned_fixes(run, world_size)
                 if peak <= gpu_memory]
        lines += fixes[:4] or combined_fix(run, world_size, gpu_memory)
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def gpu_memory_available(gpu_memory) -> float | None:
    if gpu_memory:
        return parse_bytes(gpu_memory)
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return None


def plan_run(run, world_size: int, gpu_memory=None) -> str:
    """Print and return the memory plan of a validated run (``finetuning --dry_run`` too)."""
    text = report(run, world_size, gpu_memory_available(gpu_memory), count_parameters(run))
    print(text, flush=True)
    return text


def main(world_size: int = 0, gpu_memory=None, **kwargs) -> str:
    """The memory plan of the run ``kwargs`` describe on ``world_size`` GPUs (default: the
    torchrun world, else 1); ``gpu_memory`` (e.g. 80GiB) defaults to the GPU present."""
    run = build_run_config(**kwargs)
    world_size = world_size or world_size_from_env()
    validate(run, world_size, cuda=True)
    return plan_run(run, world_size, gpu_memory)


def cli(**kwargs) -> None:
    try:
        main(**kwargs)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    fire.Fire(cli)
