"""``--deterministic``: the same inputs give the same bits, run after run, so that on a GPU an
uninterrupted and a resumed run can be compared bit for bit (CPU training is deterministic
already).

It must run before CUDA is used: cuBLAS reads ``CUBLAS_WORKSPACE_CONFIG`` when it creates its
handle, and the attention backends are chosen at each call. Costs speed: deterministic
kernels, no memory-efficient or cuDNN attention (their backward passes accumulate in an order
that varies), no cuDNN autotuning.
"""

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"  # a fixed cuBLAS workspace per stream: reproducible GEMM reductions


def make_deterministic() -> None:
    """Switch PyTorch (and flash-attention 2, when used) to deterministic algorithms; an op
    that has none then raises, naming itself, instead of silently varying."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    os.environ.setdefault("FLASH_ATTENTION_DETERMINISTIC", "1")  # transformers' flash_attn path
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # SDPA: flash (deterministic backward under use_deterministic_algorithms) and math remain
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
