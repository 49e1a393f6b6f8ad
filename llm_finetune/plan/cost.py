"""How long one optimizer step takes at a setting (micro-batch, layers recomputed, compiled or
eager layers): what ``--auto_fit`` and the GPU defaults minimise.

Counting compute per token alone picks one sequence per forward whenever that frees room to
recompute fewer layers, and measured that is sometimes the slowest choice: a small model's
micro-batch of one sequence is too small to keep the GPU busy (the host launching kernels is
the limit), and under compiled layers each 4-bit linear layer splits the compiled graph
(docs/performance.md has the runs). So a micro-batch costs the larger of

- the GPU's work: model FLOPs of the tokens, times forward + backward + recompute
  (``compute_per_token``), at the rate eager or compiled layers reach, plus reading the 4-bit
  weights and writing their bf16 copy once per pass over a layer;
- the host's: a fixed time per decoder layer per micro-batch (kernel launches, Python), more
  for compiled layers with 4-bit weights;

and a step is its micro-batches plus the optimizer's pass over the trainable weights. The rates
are fitted to step times measured on one H200 and checked against runs not used in the fit:
docs/performance.md ("The step-time model"), benchmarks/cost_model_check.py. Only the ranking
of settings of one run matters to the planner; the seconds are printed as an estimate.
"""

from dataclasses import dataclass

from llm_finetune.plan.counts import ModelCounts


@dataclass(frozen=True)
class GpuSpeed:
    eager_flops: float  # model FLOP/s of eager decoder layers
    compiled_flops: float  # of compiled ones
    layer_host_s: float  # host time per decoder layer per micro-batch, forward and backward
    layer_host_4bit_compiled_s: float  # the same for compiled layers with 4-bit weights
    bandwidth: float  # bytes/s: 4-bit dequantisation, the optimizer step


# fitted 2026-11-29 on one H200 (benchmarks/cost_model_check.py --fit); an H100 SXM has the
# same bf16 rate and a third less bandwidth, which moves none of the rankings measured
HOPPER = GpuSpeed(eager_flops=496e12, compiled_flops=635e12, layer_host_s=2.82e-3,
                  layer_host_4bit_compiled_s=5.51e-3, bandwidth=3.0e12)
DEQUANT_BYTES = 2.5  # per 4-bit weight and pass: the packed weight read, its bf16 copy written
ADAMW_BYTES = 16  # per trainable weight and step: weight, gradient, two moments read or written


def step_seconds(run, micro_batch: int, recomputed: int, work_per_token: float,
                 counts: ModelCounts, speed: GpuSpeed | None = None) -> float:
    """Seconds per optimizer step of ``run`` with ``micro_batch`` sequences per forward and
    ``recomputed`` decoder layers under activation checkpointing; ``work_per_token``: forward
    passes' worth of compute per token (``search.compute_per_token``); ``speed``: the GPU's
    rates (``HOPPER``)."""
    speed = speed or HOPPER
    t = run.train
    sequence = t.context_length
    micro_batches = t.batch_size_training * t.gradient_accumulation_steps // micro_batch
    # a forward pass per token: 2 x parameters, and attention's two matmuls over the sequence
    forward_flops = 2 * counts.total + 4 * counts.num_layers * counts.hidden * sequence
    compiled = t.torch_compile
    gpu = (micro_batch * sequence * forward_flops * work_per_token
           / (speed.compiled_flops if compiled else speed.eager_flops))
    if t.quantization == "4bit":
        passes = 2 + recomputed / counts.num_layers  # forward, backward, the recomputed share
        gpu += passes * counts.quantizable * DEQUANT_BYTES / speed.bandwidth
    per_layer = (speed.layer_host_4bit_compiled_s if compiled and t.quantization == "4bit"
                 else speed.layer_host_s)
    host = counts.num_layers * per_layer
    optimizer = counts.trainable * ADAMW_BYTES / speed.bandwidth
    return micro_batches * max(gpu, host) + optimizer
