"""Process-group set-up and tear-down, and rank helpers.

One code path serves ``torchrun`` on N GPUs (NCCL), ``torchrun`` on CPU (gloo) and a plain
``python``/notebook process. A single process that asks for FSDP gets a one-rank group, so FSDP
(and its CPU offload) also works from a notebook.
"""

import os
import socket
from datetime import timedelta
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size_from_env() -> int:
    """World size of the group we are in or are about to join (torchrun's environment)."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(need_group: bool, timeout_minutes: int = 60) -> tuple[DistInfo, bool]:
    """Join (or create) the default process group when the run is distributed or uses FSDP.

    ``timeout_minutes``: how long a collective waits for the slowest rank. torch's default (10
    minutes) is shorter than rank 0 alone reading a 70B model or writing a full state dict,
    while the other ranks wait in a broadcast or barrier (docs/large_models.md).

    Returns the rank information and whether this call created the group (then the run tears it
    down; a group the caller made, in a notebook or a test, is left to the caller)."""
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = world_size_from_env()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    created = False
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    elif need_group or world_size > 1:
        created = True
        if not launched_by_torchrun():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        rendezvous = {}
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:  # under torchrun's elastic agent
            rendezvous = dict(store=attempt_store(), rank=int(os.environ["RANK"]),
                              world_size=int(os.environ["WORLD_SIZE"]))
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                device_id=device if cuda else None,
                                timeout=timedelta(minutes=timeout_minutes), **rendezvous)
    return DistInfo(rank, local_rank, world_size, device), created


def attempt_store() -> dist.Store:
    """The rendezvous store (as ``env://`` makes it), under a prefix of torchrun's restart count.

    torchrun shares its own TCP store with the workers, and after ``--max_restarts`` restarts
    them the keys the killed attempt wrote (each rank's address) are still there: a new rank
    can read its peer's old address and fail with "Connection refused" (often:
    docs/troubleshooting.md; pytorch/pytorch#135712). Each attempt gets its own key space. On
    several nodes, where restart counts can differ between nodes, launch with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (docs/checkpoints.md)."""
    rank = int(os.environ["RANK"])
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          int(os.environ["WORLD_SIZE"]),
                          is_master=rank == 0 and not agent_hosts_store,
                          timeout=timedelta(minutes=30))
    return dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def data_parallel(model: torch.nn.Module, dist_info: DistInfo) -> torch.nn.Module:
    """``DistributedDataParallel`` over the default group: each rank holds the whole model and
    gradients are averaged in buckets during backward. For runs whose model fits one GPU and
    whose weights FSDP cannot shard: bitsandbytes 8-bit keeps row statistics outside the weight
    tensor, which DDP never touches (only trainable parameters are synchronised).

    The gradients are views into the buckets (``gradient_as_bucket_view``), not a second copy
    beside them: one gradient-sized copy less for full fine-tuning. The trainer keeps them
    (zeroed, not set to None) so they stay views from step to step."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list, device: torch.device) -> list[float]:
    """Sum a few scalars (numbers or 0-d tensors) over all ranks in one collective (float64
    keeps token counts exact)."""
    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def hybrid_mesh_shape(f, world_size: int) -> tuple[int, int]:
    """(sharding group size, replica count) for HYBRID_SHARD, filling in zeros from the world."""
    shard = f.sharding_group_size or (world_size // f.replica_group_size
                                      if f.replica_group_size else world_size)
    replica = f.replica_group_size or max(world_size // max(shard, 1), 1)
    return shard, replica
