"""FSDP settings (llama-recipes' ``fsdp_config`` names)."""

from dataclasses import dataclass


@dataclass
class fsdp_config:
    mixed_precision: bool = True  # bf16 compute, fp32 gradient reduction, fp32 master weights
    use_fp16: bool = False  # fp16 compute with a sharded gradient scaler
    # FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD
    sharding_strategy: str = "FULL_SHARD"
    hsdp: bool = False  # selects HYBRID_SHARD (llama-recipes also needs that strategy set)
    sharding_group_size: int = 0  # HYBRID_SHARD: ranks that shard one replica (0: all ranks)
    replica_group_size: int = 0  # HYBRID_SHARD: number of replicas (0: world / sharding group)
    # FULL_STATE_DICT: one Hugging Face directory; SHARDED_STATE_DICT: torch.distributed.checkpoint
    checkpoint_type: str = "SHARDED_STATE_DICT"
    fsdp_activation_checkpointing: bool = True  # recompute decoder layers in backward
    no_checkpoint_layers: int = 0  # with checkpointing: the last N layers keep activations
    fsdp_cpu_offload: bool = False  # keep parameters and gradients in CPU memory (CUDA only)
    pure_bf16: bool = False  # store weights, gradients and optimizer states in bf16
    # AdamW | anyprecision (with pure_bf16: bf16 moments, Kahan-compensated bf16 weight updates)
    optimizer: str = "AdamW"
    backward_prefetch: str = "BACKWARD_PRE"  # BACKWARD_PRE | BACKWARD_POST | NONE
    limit_all_gathers: bool = True
