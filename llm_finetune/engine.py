"""The FSDP engine: wrap a model in ``FullyShardedDataParallel`` (FSDP1).

FSDP1 is the engine because QLoRA under FSDP2 (``fully_shard``) trains with losses that drift
from single-process training (docs/fsdp.md); everything FSDP-specific lives here so that an FSDP2
engine can be added beside it.
"""

import functools

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (BackwardPrefetch, CPUOffload, FullyShardedDataParallel,
                                    MixedPrecision, ShardingStrategy)
from torch.distributed.fsdp.wrap import (_or_policy, lambda_auto_wrap_policy,
                                         transformer_auto_wrap_policy)

from llm_finetune.config_utils import hybrid_mesh_shape
from llm_finetune.distributed import DistInfo
from llm_finetune.model import decoder_layer_classes, decoder_layers
from llm_finetune.quantization import is_4bit, pending_4bit_like, quantize_pending
from llm_finetune.random_init import SeededInit


def mixed_precision_policy(compute_dtype: torch.dtype) -> MixedPrecision | None:
    """Compute in ``compute_dtype``; reduce gradients in fp32 (bf16 sums lose small updates);
    keep buffers (rotary frequencies) as they are."""
    if compute_dtype == torch.float32:
        return None
    return MixedPrecision(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def enable_activation_checkpointing(model: torch.nn.Module, keep_last: int = 0) -> None:
    """Recompute each decoder layer in backward, through transformers' own layer hooks; the
    last ``keep_last`` layers keep their activations instead (selective checkpointing: each
    layer left out saves its share of the recompute, about a third of its step time, for a
    layer's worth of activation memory; ``python -m llm_finetune.plan`` says how many fit).

    Non-reentrant checkpointing works with frozen inputs, so PEFT needs no
    ``enable_input_require_grads``. transformers checkpoints only in train mode, which
    ``load_model`` sets. Unlike torch's ``checkpoint_wrapper`` this renames no module, so
    ``peft`` still finds its adapters when saving (with the wrapper it saves an empty adapter).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not base.supports_gradient_checkpointing:
        raise ValueError(f"{type(base).__name__} does not support activation checkpointing; "
                         "set --fsdp_config.fsdp_activation_checkpointing False")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = decoder_layers(model)
    for layer in layers[len(layers) - keep_last:] if keep_last else []:
        layer.gradient_checkpointing = False  # transformers checks this flag per layer


def compile_layers(model: torch.nn.Module) -> None:
    """``torch.compile`` each decoder layer in place, as torchtitan does per block: the layers
    share one compiled graph, module names and state-dict keys stay as they are, and FSDP
    (with ``use_orig_params``) wraps the compiled layers like any other."""
    for layer in decoder_layers(model):
        layer.compile()


def move_to_meta(model: torch.nn.Module) -> None:
    """Replace every parameter and buffer by a meta tensor, keeping shared ones shared
    (``Module.to("meta")`` gives each module its own copy and unties tied embeddings)."""
    replaced = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is None:
                    continue
                if id(tensor) not in replaced:
                    meta = torch.empty_like(tensor, device="meta")
                    if is_4bit(tensor):
                        meta = pending_4bit_like(tensor, meta)
                    elif isinstance(tensor, torch.nn.Parameter):
                        meta = torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
                    replaced[id(tensor)] = (tensor, meta)
                table[name] = replaced[id(tensor)][1]


class RankZeroInit:
    """FSDP ``param_init_fn`` for ``low_cpu_fsdp``: fill every rank's tensors from rank 0.

    Rank 0 loaded the weights; it keeps them as the source and moves its module tree to the
    meta device like the other ranks. FSDP then materialises one unit at a time on every rank,
    calling this for each module: it allocates the module's own parameters and buffers,
    rank 0 copies its values in, and one broadcast per tensor gives them to the other ranks
    before FSDP flattens and shards the unit. So no rank other than 0 ever holds more than one
    unit unsharded, on CPU or GPU alike (FSDP1's ``sync_module_states`` refuses CPU tensors,
    and DCP's ``broadcast_from_rank0`` loading unshards the whole model on every rank).
    Tensors shared by two modules (tied embeddings) stay shared.

    4-bit layers (``to_4bit_layers``) receive their full-precision weight like any tensor and
    each rank quantises it on its GPU at once (the same kernel on the same values: the same
    bytes everywhere), so a GPU holds one unit in full precision at most and never the whole
    4-bit model.
    """

    def __init__(self, model: torch.nn.Module, dist_info: DistInfo):
        self.dist_info = dist_info
        self.module_names = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.module_names.setdefault(module, name)
        self.source = {}
        if dist_info.is_main:
            named = [*model.named_parameters(remove_duplicate=False),
                     *model.named_buffers(remove_duplicate=False)]
            self.source = {name: tensor.detach() for name, tensor in named}
            move_to_meta(model)  # the detached tensors above keep the loaded values alive
        self.shared = {}
        for _, tensor in [*model.named_parameters(remove_duplicate=False),
                          *model.named_buffers(remove_duplicate=False)]:
            self.shared[id(tensor)] = self.shared.get(id(tensor), 0) + 1
        # tensors registered under several names (ties): id(meta) -> (meta, materialised);
        # only these are remembered, so FSDP can free every other unsharded tensor at once
        self.done = {}

    def _materialise(self, prefix: str, name: str, meta: torch.Tensor) -> torch.Tensor:
        if id(meta) not in self.done:
            tensor = torch.empty(meta.shape, dtype=meta.dtype, device=self.dist_info.device)
            if self.dist_info.is_main:
                tensor.copy_(self.source.pop(f"{prefix}.{name}" if prefix else name))
            dist.broadcast(tensor, src=0)
            if is_4bit(meta):
                return pending_4bit_like(meta, tensor)  # quantised by __call__
            if isinstance(meta, torch.nn.Parameter):
                tensor = torch.nn.Parameter(tensor, requires_grad=meta.requires_grad)
            if self.shared.get(id(meta), 0) < 2:
                return tensor
            self.done[id(meta)] = (meta, tensor)
        return self.done[id(meta)][1]

    def __call__(self, module: torch.nn.Module) -> None:
        prefix = self.module_names[module]
        for table in (module._parameters, module._buffers):
            for name, tensor in list(table.items()):
                if tensor is not None and tensor.is_meta:
                    table[name] = self._materialise(prefix, name, tensor)
        quantize_pending(module)


def meta_init_fn(model: torch.nn.Module, dist_info: DistInfo, seed: int,
                 seeded_init: bool, from_rank0: bool):
    """FSDP's ``param_init_fn`` for a model (partly) on the meta device, or None.

    ``seeded_init``: every rank holds the model on meta and initialises its units itself
    (``SeededInit``, random weights). ``from_rank0`` (``low_cpu_fsdp``): rank 0 holds the real
    weights, the other ranks the model on meta (``RankZeroInit``).
    """
    if seeded_init:
        return SeededInit(model, seed, dist_info.device)
    if from_rank0:
        return RankZeroInit(model, dist_info)
    return None


def auto_wrap_policy(model: torch.nn.Module):
    """One FSDP unit per decoder layer; with adapters, also one per trainable leaf module.

    FSDP1 gives each unit's flat parameter one gradient the size of the whole unit. When a
    unit mixes frozen base weights and trainable adapters, that gradient covers the frozen
    weights too: as much memory as the sharded weights themselves (measured: Llama-3-70B LoRA
    on 2 H200s ran out of memory with 65 GiB of zero gradients per GPU). Wrapping the adapters
    apart leaves the layer's units wholly frozen, so they get no gradient at all."""
    layers = functools.partial(transformer_auto_wrap_policy,
                               transformer_layer_cls=decoder_layer_classes(model))
    grads = {p.requires_grad for p in model.parameters()}
    if grads != {True, False}:
        return layers

    def trainable_leaf(module: torch.nn.Module) -> bool:
        own = list(module.parameters(recurse=False))
        return not list(module.children()) and bool(own) and all(p.requires_grad for p in own)

    return functools.partial(_or_policy, policies=[
        functools.partial(lambda_auto_wrap_policy, lambda_fn=trainable_leaf), layers])


def wrap_fsdp(model: torch.nn.Module, fsdp_cfg, dist_info: DistInfo, compute_dtype: torch.dtype,
              param_init_fn=None) -> FullyShardedDataParallel:
    """Shard ``model`` with one FSDP unit per decoder layer; ``param_init_fn`` (from
    ``meta_init_fn``) materialises the units of a model built on the meta device."""
    strategy = ShardingStrategy[fsdp_cfg.sharding_strategy]
    mesh = None
    if strategy == ShardingStrategy.HYBRID_SHARD:
        shard, replica = hybrid_mesh_shape(fsdp_cfg, dist_info.world_size)
        if shard == 1:
            # Pure replication. FSDP1's HYBRID_SHARD with one-rank shard groups skips the
            # all-reduce across replicas (measured: each rank keeps its local gradient), so
            # run it as NO_SHARD, which is the same layout and reduces correctly.
            strategy = ShardingStrategy.NO_SHARD
        else:
            mesh = init_device_mesh(dist_info.device.type, (replica, shard),
                                    mesh_dim_names=("replicate", "shard"))
    return FullyShardedDataParallel(
        model,
        auto_wrap_policy=auto_wrap_policy(model),
        sharding_strategy=strategy,
        device_mesh=mesh,
        mixed_precision=mixed_precision_policy(compute_dtype),
        cpu_offload=CPUOffload(offload_params=True) if fsdp_cfg.fsdp_cpu_offload else None,
        backward_prefetch=(None if fsdp_cfg.backward_prefetch == "NONE"
                           else BackwardPrefetch[fsdp_cfg.backward_prefetch]),
        limit_all_gathers=fsdp_cfg.limit_all_gathers,
        device_id=dist_info.device,  # on CPU too: FSDP otherwise looks for an accelerator
        param_init_fn=param_init_fn,
        use_orig_params=True,  # frozen and trainable PEFT parameters may share a unit
    )
