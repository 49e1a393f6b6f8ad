"""The FSDP engine: wrap a model in ``FullyShardedDataParallel`` (FSDP1).

FSDP1 is the engine because QLoRA under FSDP2 (``fully_shard``) trains with losses that drift
from single-process training (docs/fsdp.md); everything FSDP-specific lives here so that an FSDP2
engine can be added beside it.
"""

import functools

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (BackwardPrefetch, CPUOffload, FullyShardedDataParallel,
                                    MixedPrecision, ShardingStrategy)
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from llm_finetune.config_utils import hybrid_mesh_shape
from llm_finetune.distributed import DistInfo
from llm_finetune.model import decoder_layer_classes


def mixed_precision_policy(compute_dtype: torch.dtype) -> MixedPrecision | None:
    """Compute in ``compute_dtype``; reduce gradients in fp32 (bf16 sums lose small updates);
    keep buffers (rotary frequencies) as they are."""
    if compute_dtype == torch.float32:
        return None
    return MixedPrecision(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward, through transformers' own layer hooks.

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


def wrap_fsdp(model: torch.nn.Module, fsdp_cfg, dist_info: DistInfo, compute_dtype: torch.dtype,
              from_rank0: bool) -> FullyShardedDataParallel:
    """Shard ``model`` with one FSDP unit per decoder layer.

    ``from_rank0`` (``low_cpu_fsdp``): only rank 0 holds real weights; the other ranks hold the
    model on the meta device. Their shards are allocated empty and then filled from rank 0's
    full state dict one tensor at a time (``broadcast_from_rank0``), so no other rank ever holds
    a full copy. This also works on CPU, where FSDP1's ``sync_module_states`` refuses to run.
    """
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
    full_state = model.state_dict() if from_rank0 and dist_info.is_main else {}
    meta_rank = from_rank0 and not dist_info.is_main
    if meta_rank and has_tied_parameters(model):
        # Materialising module by module would give each side of a tie (input embedding and
        # lm_head) its own tensor, so FSDP would lay out this rank differently from rank 0. Such
        # models are small-vocabulary-heavy ones (1-3B); allocate them whole, uninitialised, and
        # restore the ties before sharding.
        model.to_empty(device=dist_info.device)
        model.tie_weights()
        meta_rank = False

    def materialise(module: torch.nn.Module) -> None:
        module.to_empty(device=dist_info.device, recurse=False)

    sharded = FullyShardedDataParallel(
        model,
        auto_wrap_policy=functools.partial(transformer_auto_wrap_policy,
                                           transformer_layer_cls=decoder_layer_classes(model)),
        sharding_strategy=strategy,
        device_mesh=mesh,
        mixed_precision=mixed_precision_policy(compute_dtype),
        cpu_offload=CPUOffload(offload_params=True) if fsdp_cfg.fsdp_cpu_offload else None,
        backward_prefetch=(None if fsdp_cfg.backward_prefetch == "NONE"
                           else BackwardPrefetch[fsdp_cfg.backward_prefetch]),
        limit_all_gathers=fsdp_cfg.limit_all_gathers,
        device_id=dist_info.device,  # on CPU too: FSDP otherwise looks for an accelerator
        param_init_fn=materialise if meta_rank else None,
        use_orig_params=True,  # frozen and trainable PEFT parameters may share a unit
    )
    if from_rank0:
        set_model_state_dict(sharded, full_state, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
        del full_state
        broadcast_non_persistent_buffers(sharded)
    return sharded


def has_tied_parameters(model: torch.nn.Module) -> bool:
    """True when one parameter is registered under two names (e.g. tied embeddings)."""
    return len(list(model.named_parameters(remove_duplicate=False))) > len(list(model.parameters()))


def broadcast_non_persistent_buffers(model: torch.nn.Module) -> None:
    """Buffers outside the state dict (e.g. rotary ``inv_freq``) are garbage after ``to_empty``
    on the meta ranks; copy rank 0's. They are small and not sharded."""
    for module in model.modules():
        for name in sorted(getattr(module, "_non_persistent_buffers_set", ())):
            buffer = getattr(module, name, None)
            if isinstance(buffer, torch.Tensor):
                dist.broadcast(buffer, src=0)
