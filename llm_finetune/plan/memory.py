"""How many bytes a run needs, per GPU and per rank's CPU RAM, from its parameter counts.

``estimate`` adds up, per GPU: weights, gradients and optimizer states (divided by the FSDP shard
group), the FSDP units gathered at once, activations (per token, per layer, with or without
checkpointing), the loss's logits and a fixed workspace; the peak is the larger of the end of
forward and the end of backward (and, for QLoRA under FSDP, the moment of loading). It also
names the traps users hit (``notes``), and reads a GPU's memory from ``--gpu_memory`` or the GPU
present (``parse_bytes``, ``gpu_memory_available``).

A vision-language model adds its image side's activations (``image_activation_bytes``): the
image encoder's layers over every tile's patches, and the text decoder's cross-attention layers
over the image tokens, planned for ``--images_per_sample`` images (default one) of the most
tiles per sequence.
"""

import os
import re
from dataclasses import dataclass, field

import torch

from llm_finetune.config_utils import ConfigError
from llm_finetune.distributed import hybrid_mesh_shape
from llm_finetune.loss import CHUNK_TOKENS
from llm_finetune.model import init_after_adapters, quantized_at_load, weights_on_disk
from llm_finetune.plan.counts import ModelCounts, VisionCounts, count_parameters
from llm_finetune.precision import choose_precision

GIB = 2**30
# what the CUDA caching allocator, cuBLAS/attention workspaces and NCCL add beyond the tensors
WORKSPACE_BYTES = 0.35 * GIB


@dataclass
class Plan:
    gpu: dict[str, float] = field(default_factory=dict)  # bytes per GPU, by component
    cpu: dict[str, float] = field(default_factory=dict)  # bytes per rank in CPU RAM
    notes: list[str] = field(default_factory=list)
    gpu_loading: float = 0.0  # bytes per GPU while loading, before FSDP shards (QLoRA)
    # DDP at the start of step 2: it allocates its gradient buckets again, in the order backward
    # made the gradients, while the gradients (views of the first buckets) still hold those
    gpu_rebucketing: float = 0.0
    # Two moments of a step hold different things: at the end of forward, the activations and
    # the loss, but no gradients yet (set to None after the last optimizer step, unless
    # accumulation or DDP keeps them); at the end of backward, every gradient, but only the layer
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
        return max(self.forward_end, self.backward_end, self.gpu_loading, self.gpu_rebucketing)


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
                                         compiled: bool = False,
                                         flash_copies: bool = False) -> float:
    """Tensors a Llama-style decoder layer keeps for backward, per token: about ten hidden-size
    vectors (norm inputs and outputs, q and its rotated copy, attention output, residuals), four
    of the key/value width (k, v and their rotated or repeated copies) and four of the MLP width
    (gate, up, activation, product). A frozen linear layer needs no input for its gradient, so
    with a frozen base (LoRA, QLoRA) the inputs of the output and down projections go: one
    hidden and one MLP vector fewer. Measured on Llama-3-8B in bf16
    (benchmarks/layer_activations.py): 201 KB per token and layer for full fine-tuning, 164 KB
    for LoRA; this gives 205 and 168. ``flash_copies``: eager layers whose packed batches go
    through a flash-attention kernel (varlen or flash-attention 2) keep q and k once more, in
    the kernel's token-major layout (measured on the same model at 4 x 2048 tokens: 3 GiB
    above flex attention, which takes them as they are; docs/performance.md)."""
    vectors = 10 * counts.hidden + 4 * counts.kv_dim + 4 * counts.intermediate
    if frozen_base:
        vectors -= counts.hidden + counts.intermediate
    if flash_copies and not compiled:
        vectors += counts.hidden + counts.kv_dim
    return compute_bytes * vectors * (COMPILED_ACTIVATIONS if compiled else 1.0)


def vision_layer_bytes_per_token(vision: VisionCounts, compute_bytes: int,
                                 frozen_base: bool = False) -> float:
    """Tensors an image encoder layer (pre-norm attention without rotary or grouped heads, a
    GELU MLP, tanh gates on the global layers) keeps for backward, per patch: its two norms'
    inputs and outputs, q, k, v, the attention output, the gated residual branches (about ten
    hidden vectors) and the MLP's two intermediate ones (fc1 output and GELU). Frozen (LoRA
    adapters in it), the inputs of the output projection and fc2 go, as in a text layer."""
    vectors = 10 * vision.hidden + 2 * vision.intermediate
    if frozen_base:
        vectors -= vision.hidden + vision.intermediate
    return compute_bytes * vectors


def cross_attention_bytes_per_image_token(counts: ModelCounts, compute_bytes: int) -> float:
    """What one cross-attention layer keeps per image token: keys and values (their norm's
    input and output for the keys) and the copies repeated to every query head for masked
    attention."""
    return compute_bytes * (4 * counts.kv_dim + 2 * counts.hidden)


def image_encoder_bytes(run, vision: VisionCounts, compute_bytes: int,
                        images: int) -> tuple[float, float]:
    """What the image encoder's layers keep for backward when the image side trains, for
    ``images`` images: (at the end of forward, one layer recomputed in backward). Under
    activation checkpointing each layer keeps its input only (one hidden vector per patch;
    ``engine.checkpoint_forward``, since transformers does not checkpoint these layers) and
    backward recomputes one layer at a time; otherwise every layer keeps all of its own."""
    patches = images * vision.encoder_tokens
    frozen_base = run.train.use_peft
    layer = patches * vision_layer_bytes_per_token(vision, compute_bytes, frozen_base)
    # beside the layers: the attention mask over each image's patches, one tensor all layers
    # keep; the norms and gated embeddings around the layers (about three hidden vectors per
    # patch, one when only adapters inside the layers train); and the pixels, the patch
    # embedding's input, kept for its weight's gradient when it trains
    around = images * vision.encoder_tokens ** 2 * compute_bytes + (
        patches * vision.hidden * compute_bytes if frozen_base
        else 3 * patches * vision.hidden * compute_bytes + images * vision.pixels * compute_bytes)
    if run.fsdp.fsdp_activation_checkpointing:
        return around + vision.layers * patches * vision.hidden * compute_bytes, layer
    return around + vision.layers * layer, 0.0


def image_activation_bytes(run, counts: ModelCounts, compute_bytes: int,
                           images: int) -> dict[str, float]:
    """The image side's activations at the end of forward, by part, for ``images`` images of
    ``counts.vision.tiles`` tiles. The image encoder keeps them only when something on the
    image side trains (full fine-tuning, ``--freeze_LLM_only``, LoRA with
    ``lora_config.vision_encoder``): its layers' (``image_encoder_bytes``), and, when the
    projector trains, the projector's input; the projector's output feeds every
    cross-attention layer (kept once), whose keys and values over the image tokens are kept
    for the layers not checkpointed."""
    vision, f = counts.vision, run.fsdp
    parts = {}
    if vision.trains:
        projector_input = 0 if run.train.use_peft else vision.output_dim  # its weight's grad
        kept, _ = image_encoder_bytes(run, vision, compute_bytes, images)
        layers = (f"checkpointed: {vision.layers} layer inputs" if f.fsdp_activation_checkpointing
                  else f"{vision.layers} layers")
        parts[f"image encoder activations ({images} images x {vision.encoder_tokens} patches, "
              f"{layers})"] = (
            kept + images * vision.image_tokens * projector_input * compute_bytes)
    kept = vision.cross_layers
    if f.fsdp_activation_checkpointing:  # the last no_checkpoint_layers keep theirs
        kept = [i for i in kept if i >= counts.num_layers - f.no_checkpoint_layers]
    image_tokens = images * vision.image_tokens
    parts[f"cross-attention over {image_tokens} image tokens ({len(kept)} of "
          f"{len(vision.cross_layers)} layers kept)"] = (
        image_tokens * counts.hidden * compute_bytes
        + len(kept) * image_tokens * cross_attention_bytes_per_image_token(counts, compute_bytes))
    return parts


def sequences_per_sample(run) -> int:
    """A DPO sample is a pair: its chosen and rejected sequences go through one forward."""
    return 2 if run.train.method == "dpo" else 1


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
    # AdamW: two moments per trainable weight; anyprecision: and a Kahan compensation
    states_per_weight = 3 if f.optimizer == "anyprecision" else 2
    optimizer = states_per_weight * counts.trainable * adapter_bytes
    if t.enable_fsdp and quantized_at_load(t):
        # every rank loads the whole quantised model onto its GPU, then FSDP keeps its shard
        # (under low_cpu_fsdp, and for random-init models, FSDP quantises unit by unit instead)
        plan.gpu_loading = weights + WORKSPACE_BYTES
    # DDP's gradients are views into its buckets, kept from step to step (engine: data_parallel)
    gradients = "gradients (in DDP's buckets, kept)" if t.enable_ddp else "gradients"
    states = {"weights": weights / shards, gradients: grads / shards,
              f"optimizer states ({f.optimizer})": optimizer / shards}
    if t.gradient_accumulation_steps == 1 and not t.enable_ddp:
        plan.backward_only.add("gradients")
    if offload:
        plan.cpu.update({f"{k} (CPU offload)": v for k, v in states.items()})
        plan.gpu["weights (CPU offload: none resident)"] = 0.0
    else:
        plan.gpu.update(states)
    if t.method == "dpo" and not t.use_peft:  # the reference model: a frozen copy
        plan.gpu["reference model (frozen copy, DPO)"] = counts.total * weight_bytes
    if precision.grad_scaler and counts.trainable:
        # fp16 loss scaling costs about one fp32 copy of the trainable weights' gradients at
        # the optimizer step on top of bf16's peak (measured on full fine-tuning: docs/memory.md)
        plan.gpu["fp16 loss scaling (gradients unscaled)"] = counts.trainable * 4 / shards
        plan.backward_only.add("fp16 loss scaling (gradients unscaled)")  # at the optimizer step
    # the tokens of one micro-batch, every sequence of it (DPO: both sides of each pair)
    tokens = t.batch_size_training * t.context_length * sequences_per_sample(run)
    if t.quantization == "8bit":
        # LLM.int8's matmuls quantise each input row and keep int32 outputs and fp16 outliers:
        # buffers in proportion to the tokens, fitted on one measurement (docs/memory.md)
        plan.gpu["8-bit matmul buffers (LLM.int8)"] = tokens * counts.hidden * 96
    if t.enable_ddp:  # found with --memory_snapshot_step (docs/memory.md)
        plan.gpu_rebucketing = (sum(states.values()) + grads + WORKSPACE_BYTES
                                + plan.gpu.get("reference model (frozen copy, DPO)", 0.0))
    if t.enable_fsdp and (shards > 1 or offload or compute_bytes != weight_bytes):
        # FSDP1 keeps the root unit (embeddings, lm_head) gathered from forward to backward, and
        # gathers at most two decoder layers ahead (prefetch); mixed precision casts them too
        layer_bytes = quantized_bytes_per_param(run) if t.quantization else compute_bytes
        gathered = counts.outside_layers * compute_bytes + 2 * counts.largest_layer * layer_bytes
        gathered += counts.largest_layer * 4 if counts.trainable else 0  # unsharded fp32 grads
        plan.gpu["gathered FSDP units (root + 2 layers)"] = gathered

    plan_activations(plan, run, counts, compute_bytes, tokens)
    plan.gpu["workspace (allocator, cuBLAS, NCCL)"] = WORKSPACE_BYTES

    full_model = counts.total * weight_bytes
    plan_cpu_loading(plan, t, full_model)
    notes(plan, run, counts, world_size, local_world_size, full_model, weights_on_disk(t))
    return plan


def plan_activations(plan: Plan, run, counts: ModelCounts, compute_bytes: int,
                     tokens: int) -> None:
    """What forward keeps for backward (all layers, or checkpointed layers' inputs) and the
    loss's buffers: both exist at the end of forward only."""
    t, f = run.train, run.fsdp
    # DPO's reference forward keeps nothing (no_grad) and ends before the policy's begins.
    # --freeze_LLM_only freezes the self-attention layers (4 in 5; the cross-attention ones
    # train, a few percent more each): planned as a frozen base
    per_layer = tokens * activation_bytes_per_token_per_layer(
        counts, compute_bytes, frozen_base=t.use_peft or t.freeze_LLM_only,
        compiled=t.torch_compile,
        flash_copies=t.use_fast_kernels and t.batching_strategy == "packing")
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
    # DPO's trained output layer takes the logits path (preference.PreferenceLoss)
    if t.chunked_loss and not (t.method == "dpo" and not t.use_peft):
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
    if counts.vision is not None:  # a DPO pair's images on both sides
        images = t.batch_size_training * sequences_per_sample(run) * t.images_per_sample
        image_side = image_activation_bytes(run, counts, compute_bytes, images)
        plan.gpu.update(image_side)
        plan.forward_only |= set(image_side)
        # a recomputed cross-attention layer's keys and values over the image tokens
        plan.backward_activations += (images * counts.vision.image_tokens
                                      * cross_attention_bytes_per_image_token(counts,
                                                                              compute_bytes))
        if counts.vision.trains:
            # the image encoder's backward comes last, the text's activations gone, its own
            # still there (all of them, or the layer inputs and one recomputed layer)
            kept, recomputed = image_encoder_bytes(run, counts.vision, compute_bytes, images)
            plan.backward_activations = max(plan.backward_activations, kept + recomputed)


def plan_cpu_loading(plan: Plan, t, full_model: float) -> None:
    """CPU RAM per rank while the weights load."""
    if init_after_adapters(t) or quantized_at_load(t):
        plan.cpu["loading"] = 0.0  # built on meta / quantised onto the GPU as it loads
    elif t.low_cpu_fsdp:
        plan.cpu["loading (rank 0 only; other ranks ~0)"] = full_model
    else:
        plan.cpu["loading (every rank)"] = full_model


def host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def notes(plan: Plan, run, counts: ModelCounts, world_size: int, local_world_size: int,
          full_model: float, on_disk: bool) -> None:
    """The traps users hit, said before the launch."""
    t, f = run.train, run.fsdp
    if t.float8:
        plan.notes.append(
            "--float8 saves smaller activations for backward than this plan counts (bf16's): "
            "the run peaks lower than planned (measured: docs/performance.md)")
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
                          "from_pretrained returns), so it is really on" + (
                              "; PEFT needs no enable_input_require_grads" if t.use_peft else ""))
    if t.batching_strategy == "padding":
        plan.notes.append("padding batches are planned at the full context_length; shorter "
                          "batches need less")
    if counts.vision is not None:
        n = t.images_per_sample
        plan.notes.append(f"planned for {'one image' if n == 1 else f'{n} images'} of "
                          f"{counts.vision.tiles} tiles per sequence (--images_per_sample); rows "
                          "with more images need more for the image parts")


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


def gpu_memory_available(gpu_memory) -> float | None:
    if gpu_memory:
        return parse_bytes(gpu_memory)
    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory)
    return None
