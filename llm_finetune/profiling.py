"""``--flop_counter`` and ``--use_profiler`` (llama-recipes flags), around optimizer steps.

- flop counter: ``torch.utils.flop_counter.FlopCounterMode`` over optimizer step
  ``flop_counter_start + 1`` (the first steps warm up); prints and returns TFLOPs per step for
  this rank.
- profiler: ``torch.profiler`` with a wait/warm-up/active schedule, writing a TensorBoard trace
  per rank to ``profiler_dir`` (default ``output_dir/profiler``).
Both at once would count the profiler's own work, so that is refused (as in llama-recipes).
"""

import contextlib
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from llm_finetune.errors import ConfigError


class StepProfiler:
    def __init__(self, train_cfg, is_main: bool):
        self.cfg = train_cfg
        self.is_main = is_main
        self.flops_per_step = None
        self.profiler = None
        if train_cfg.use_profiler:
            trace_dir = Path(train_cfg.profiler_dir or Path(train_cfg.output_dir) / "profiler")
            trace_dir.mkdir(parents=True, exist_ok=True)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(
                activities=activities,
                schedule=torch.profiler.schedule(wait=1, warmup=2, active=3, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(str(trace_dir)),
                profile_memory=True, with_stack=False, record_shapes=True)
            self.profiler.start()

    @contextlib.contextmanager
    def step(self, step: int):
        """Context around optimizer step ``step`` (1-based)."""
        if self.cfg.flop_counter and step == self.cfg.flop_counter_start + 1:
            counter = FlopCounterMode(display=False)
            with counter:
                yield
            self.flops_per_step = counter.get_total_flops()
            if self.is_main:
                print(f"step {step}: {self.flops_per_step / 1e12:.4f} TFLOPs on this rank",
                      flush=True)
            return
        yield
        if self.profiler is not None:
            self.profiler.step()

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()


def check_profiling_settings(t) -> None:
    if t.flop_counter and t.use_profiler:
        raise ConfigError("--flop_counter and --use_profiler at once would count the profiler's "
                          "own work: use one of them per run")
