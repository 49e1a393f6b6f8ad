"""The FSDP engine: wrap a model in ``FullyShardedDataParallel`` (FSDP1).

FSDP1 is the engine because QLoRA under FSDP2 (``fully_shard``) trains with losses that drift
from single-process training (docs/fsdp.md); everything FSDP-specific lives here so that an FSDP2
engine can be added beside it.
"""

import functools

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (BackwardPrefetch, CPUOffload, FullyShardedDataParallel,
                                    MixedPrecision, ShardingStrategy)
from torch.distributed.fsdp.wrap import (_or_policy, lambda_auto_wrap_policy,
                                         transformer_auto_wrap_policy)
from transformers.modeling_layers import GradientCheckpointingLayer

from llm_finetune.distributed import DistInfo, hybrid_mesh_shape
from llm_finetune.errors import ConfigError
from llm_finetune.adapters import base_model_of
from llm_finetune.model import (decoder_layer_classes, decoder_layers, image_encoder_layers,
                                text_layers)
from llm_finetune.quantization import is_4bit, pending_4bit_like, quantize_pending
from llm_finetune.random_init import SeededInit
from llm_finetune.vision import image_side_trains, is_vision_config


def mixed_precision_policy(compute_dtype: torch.dtype) -> MixedPrecision | None:
    """Compute in ``compute_dtype``; reduce gradients in fp32 (bf16 sums lose small updates);
    keep buffers (rotary frequencies) as they are.

    Every unit casts its floating-point inputs to the compute dtype, not only the root: an
    adapter in a unit of its own is called from inside its layer's forward, and peft first casts
    the layer's input to the dtype the adapter's weight has outside its unit's forward (the
    fp32 master), which would meet the unit's bf16 weight in the matmul."""
    if compute_dtype == torch.float32:
        return None
    return MixedPrecision(param_dtype=compute_dtype, reduce_dtype=torch.float32,
                          cast_forward_inputs=True)


def enable_activation_checkpointing(model: torch.nn.Module, keep_last: int = 0) -> None:
    """Recompute each decoder layer in backward, through transformers' own layer hooks, and a
    vision model's image encoder layers, which transformers does not checkpoint, when the
    image side trains (``checkpoint_forward``); the last ``keep_last`` text decoder layers keep
    their activations instead (selective checkpointing: each
    layer left out saves its share of the recompute, about a third of its step time, for a
    layer's worth of activation memory; ``python -m llm_finetune.plan`` says how many fit).

    Non-reentrant checkpointing works with frozen inputs, so PEFT needs no
    ``enable_input_require_grads``. transformers checkpoints only in train mode, which
    ``load_model`` sets. Unlike torch's ``checkpoint_wrapper`` this renames no module, so
    ``peft`` still finds its adapters when saving (with the wrapper it saves an empty adapter).
    """
    base = base_model_of(model)
    if not base.supports_gradient_checkpointing:
        raise ValueError(f"{type(base).__name__} does not support activation checkpointing; "
                         "set --fsdp_config.fsdp_activation_checkpointing False")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if is_vision_config(base.config):
        # transformers also makes the output of every sub-model's input embedding require grad
        # (for reentrant checkpointing), the image encoder's patch embedding included: a frozen
        # encoder (LoRA on the language model) would then keep all its activations and run
        # backward for nothing. Non-reentrant checkpointing needs none of it
        base.disable_input_require_grads()
        if image_side_trains(model):  # a frozen encoder keeps nothing: nothing to recompute
            for layer in image_encoder_layers(model):
                # LLaVA's CLIP layers are transformers' checkpointing layers, enabled above
                if not isinstance(layer, GradientCheckpointingLayer):
                    checkpoint_forward(layer)
    layers = text_layers(model)  # keep_last counts the text decoder's layers only
    for layer in layers[len(layers) - keep_last:] if keep_last else []:
        layer.gradient_checkpointing = False  # transformers checks this flag per layer


def checkpoint_forward(layer: torch.nn.Module) -> None:
    """Recompute ``layer`` in backward, for layers transformers does not checkpoint itself
    (mllama's image encoder layers are plain modules, not its ``GradientCheckpointingLayer``).

    The layer's own ``forward`` is replaced on the instance, as transformers' layers do it on
    their class: no module is renamed (``checkpoint_wrapper`` would nest it, and peft would
    save an empty adapter), the state dict is the same, and FSDP's unit around the layer
    gathers its weights outside the checkpoint, so the recompute does not gather them twice.
    The function holds the layer as a ``partial`` argument, so a deep copy of the model (DPO's
    frozen reference) recomputes its own copy of the layer, not this one."""
    layer.forward = functools.partial(checkpointed_forward, layer)


def checkpointed_forward(layer: torch.nn.Module, *args, **kwargs):
    """``layer``'s class forward under non-reentrant checkpointing when it trains (in eval mode
    and under ``no_grad`` nothing is kept, so it runs as it is). Tensors given as keywords
    (the image encoder calls its layers with ``hidden_state=``) become the checkpoint's
    inputs, which it saves for backward where saved-tensor hooks see them (a keyword argument
    it would only hold), and reach the forward under the keyword they were given: transformers
    renames deprecated keywords in the forward's own decorator (5.17 calls the layers with
    ``hidden_state=``, a name their signature no longer has)."""
    forward = functools.partial(type(layer).forward, layer)
    if not (layer.training and torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    tensor_keys = [key for key, value in kwargs.items() if isinstance(value, torch.Tensor)]
    others = {key: value for key, value in kwargs.items() if key not in tensor_keys}

    def run(*inputs):
        keyword_tensors = dict(zip(tensor_keys, inputs[len(args):]))
        return forward(*inputs[:len(args)], **keyword_tensors, **others)

    return torch.utils.checkpoint.checkpoint(run, *args, *(kwargs[key] for key in tensor_keys),
                                             use_reentrant=False)


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
    """One FSDP unit per decoder layer; when a layer mixes frozen and trainable weights
    (adapters), the trainable ones get units of their own.

    FSDP1 flattens a unit into one parameter, of one dtype, with one gradient the size of the
    whole unit. Adapters kept apart from their layer can keep fp32 master weights beside a base
    stored in the compute dtype, and they leave the layer's units wholly frozen, so those get no
    gradient at all (mixed, the gradient also covers the frozen weights: Llama-3-70B LoRA on 2
    H200s ran out of memory that way, docs/fsdp.md). Full fine-tuning with frozen layers
    (``freeze_layers``) needs none of this: each layer is wholly frozen or wholly trainable."""
    layer_classes = decoder_layer_classes(model)
    layers = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls=layer_classes)
    if not any(mixes_frozen_and_trainable(unit) for unit in layer_units(model)):
        return layers
    apart = adapter_units(model)
    return functools.partial(_or_policy, policies=[
        functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda module: module in apart),
        layers])


def layer_units(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """The parameters of each decoder layer, and those outside every layer (the root unit)."""
    layers = [list(layer.parameters()) for layer in decoder_layers(model)]
    in_layers = {id(p) for params in layers for p in params}
    return [*layers, [p for p in model.parameters() if id(p) not in in_layers]]


def mixes_frozen_and_trainable(params: list[torch.nn.Parameter]) -> bool:
    return len({p.requires_grad for p in params}) == 2


def adapter_units(model: torch.nn.Module) -> set[torch.nn.Module]:
    """The modules that become FSDP units of their own beside the decoder layers: each module
    whose own parameters all train (LoRA's A and B, a prefix encoder, llama_adapter's adapted
    attention), and inside such a module each one holding frozen weights (the projections of
    the attention that llama_adapter wraps), which would otherwise join the adapter's unit.
    Those are wrapped one by one, not as their parent: llama_adapter calls the projections
    directly, outside their attention module's forward, where a parent's unit is sharded."""
    def own_grads(module) -> set[bool]:
        return {p.requires_grad for p in module.parameters(recurse=False)}

    owners = {m for m in model.modules() if own_grads(m) == {True}}
    frozen_inside = {inner for owner in owners for inner in owner.modules()
                     if inner is not owner and own_grads(inner) == {False}}
    return owners | frozen_inside


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
    replicated = strategy == ShardingStrategy.NO_SHARD or dist_info.world_size == 1
    ignored = (frozen_in_compute_dtype(model, compute_dtype)
               if replicated and not fsdp_cfg.fsdp_cpu_offload else [])
    if param_init_fn is not None and any(p.is_meta for p in ignored):
        # FSDP materialises only what it manages: build the left-out ones first (ties kept)
        left_out = {id(p) for p in ignored}
        for module in [m for m in model.modules()
                       if any(id(p) in left_out for p in m.parameters(recurse=False))]:
            param_init_fn(module)
        ignored = frozen_in_compute_dtype(model, compute_dtype)
    wrapped = FullyShardedDataParallel(
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
        ignored_states=ignored or None,
    )
    for param in ignored:  # FSDP leaves them where they are; every rank holds them whole
        if param.device != dist_info.device:
            param.data = param.data.to(dist_info.device)
    return wrapped


def frozen_in_compute_dtype(model: torch.nn.Module,
                            compute_dtype: torch.dtype) -> list[torch.nn.Parameter]:
    """The frozen weights (a PEFT base) that an unsharded FSDP (NO_SHARD, or one rank) leaves
    out. Unsharded, FSDP1 never restores a frozen unit's parameters after backward: they stay
    plain tensors, so a tied embedding fails the next forward ('as_params=True
    type(prim_param)=Tensor') and the state dict misses them ('FSDP assumes ... is in the
    state_dict'). Left out, they sit on each rank whole, as unsharded FSDP would keep them, with
    nothing to reduce since nothing trains them. Only weights already in the compute dtype (no
    cast needed: a frozen base is stored that way) are left out."""
    return [p for p in model.parameters()  # each shared (tied) weight once
            if not p.requires_grad and p.dtype == compute_dtype]


def check_engine_settings(run, world_size: int, cuda: bool) -> None:
    """How the ranks share the work (FSDP, DDP, one process), the FSDP mesh, CPU offload and
    which layers activation checkpointing leaves out."""
    t, f = run.train, run.fsdp
    if world_size > 1 and not (t.enable_fsdp or t.enable_ddp):
        raise ConfigError(f"launched on {world_size} ranks without --enable_fsdp or --enable_ddp: "
                          "every rank would train its own copy. Add --enable_fsdp (sharded), "
                          "--enable_ddp (a full replica per rank), or run one process.")
    if t.one_gpu and world_size > 1:
        raise ConfigError(f"--one_gpu asks for a single-process run, but {world_size} ranks "
                          "were launched: drop --one_gpu or launch one process")
    if t.enable_fsdp and t.enable_ddp:
        raise ConfigError("--enable_fsdp and --enable_ddp are two ways to train data parallel: "
                          "pick one (FSDP shards the model, DDP replicates it)")
    if t.low_cpu_fsdp and not t.enable_fsdp:
        raise ConfigError("--low_cpu_fsdp loads weights on rank 0 and lets FSDP share them; it "
                          "needs --enable_fsdp")
    if f.fsdp_cpu_offload and not cuda:
        raise ConfigError("--fsdp_config.fsdp_cpu_offload moves parameters from GPU to CPU "
                          "memory; without a GPU there is nothing to offload: drop it")
    if t.enable_fsdp and f.sharding_strategy == "HYBRID_SHARD":
        shard, replica = hybrid_mesh_shape(f, world_size)
        if shard * replica != world_size:
            raise ConfigError(
                f"HYBRID_SHARD with sharding_group_size={shard} and replica_group_size={replica} "
                f"needs {shard * replica} ranks, but {world_size} were launched. Set "
                f"--fsdp_config.sharding_group_size to the GPUs per node and "
                f"--fsdp_config.replica_group_size to the number of nodes.")
    if f.no_checkpoint_layers < 0:
        raise ConfigError(f"--fsdp_config.no_checkpoint_layers must be 0 or more, got "
                          f"{f.no_checkpoint_layers}")
    if f.no_checkpoint_layers and not f.fsdp_activation_checkpointing:
        raise ConfigError("--fsdp_config.no_checkpoint_layers chooses layers to leave out of "
                          "activation checkpointing, which is off: drop it, or turn "
                          "--fsdp_config.fsdp_activation_checkpointing on")
