"""``--flop_counter`` and ``--use_profiler`` (llama-recipes flags), and
``--memory_snapshot_step``, around optimizer steps.

- flop counter: ``torch.utils.flop_counter.FlopCounterMode`` over optimizer step
  ``flop_counter_start + 1`` (the first steps warm up); prints and returns TFLOPs per step for
  this rank.
- profiler: ``torch.profiler`` with a wait/warm-up/active schedule, writing a TensorBoard trace
  per rank to ``profiler_dir`` (default ``output_dir/profiler``).
- memory snapshot: the CUDA caching allocator's history (each allocation with its stack) from
  the first step to the end of step ``memory_snapshot_step``, dumped per rank to
  ``output_dir/memory_snapshot/rankR.pickle`` for https://pytorch.org/memory_viz: what holds
  the memory at a peak the planner did not expect (the second step holds the optimizer's
  states, the first does not).
Both the flop counter and the profiler at once would count the profiler's own work, so that is
refused (as in llama-recipes).
"""

import contextlib
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from llm_finetune.errors import ConfigError

SNAPSHOT_ENTRIES = 100_000  # allocator events kept: a few training steps of an 8B model


class StepProfiler:
    def __init__(self, train_cfg, is_main: bool, rank: int = 0, first_step: int = 1):
        """``first_step``: the step this run starts at (a resumed run's is past 1)."""
        self.cfg = train_cfg
        self.is_main = is_main
        self.rank = rank
        self.flops_per_step = None
        self.profiler = None
        self.recording = bool(train_cfg.memory_snapshot_step)
        if self.recording and train_cfg.memory_snapshot_step < first_step:
            self.recording = False
            if is_main:
                print(f"--memory_snapshot_step {train_cfg.memory_snapshot_step}: this run starts "
                      f"at step {first_step}, after it; no snapshot", flush=True)
        if self.recording:
            # Python frames only: C++ frames take minutes to symbolise at the dump
            torch.cuda.memory._record_memory_history(stacks="python",
                                                     max_entries=SNAPSHOT_ENTRIES)
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
        counting = self.cfg.flop_counter and step == self.cfg.flop_counter_start + 1
        counter = FlopCounterMode(display=False) if counting else contextlib.nullcontext()
        with counter:
            yield
        if counting:
            self.flops_per_step = counter.get_total_flops()
            if self.is_main:
                print(f"step {step}: {self.flops_per_step / 1e12:.4f} TFLOPs on this rank",
                      flush=True)
        elif self.profiler is not None:
            self.profiler.step()
        if self.recording and step == self.cfg.memory_snapshot_step:
            self.dump_memory_snapshot(f"to the end of step {step}")

    def dump_memory_snapshot(self, until: str) -> None:
        path = Path(self.cfg.output_dir) / "memory_snapshot" / f"rank{self.rank}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        self.recording = False
        print(f"rank {self.rank}: the GPU's allocations {until} in {path} (what held the "
              f"peak: python -m llm_finetune.memory_peak {path}; the picture: "
              "https://pytorch.org/memory_viz)", flush=True)

    def close(self, error: BaseException | None = None) -> None:
        """At the end of training, or when it failed with ``error``: a snapshot not yet
        written is written now (the run ended before its step, or ran out of memory in it)."""
        if self.profiler is not None:
            self.profiler.stop()
        if self.recording:
            self.dump_memory_snapshot(f"until {type(error).__name__}" if error is not None
                                      else "until the run ended, before the step asked for")


def check_profiling_settings(t, cuda: bool) -> None:
    if t.flop_counter and t.use_profiler:
        raise ConfigError("--flop_counter and --use_profiler at once would count the profiler's "
                          "own work: use one of them per run")
    if t.memory_snapshot_step < 0:
        raise ConfigError(f"--memory_snapshot_step {t.memory_snapshot_step}: an optimizer step "
                          "(1 or more), or 0 for no snapshot")
    if t.memory_snapshot_step and not cuda and not t.dry_run:
        raise ConfigError("--memory_snapshot_step records the CUDA allocator's history, and "
                          "no GPU is visible here: run it on a GPU, or drop it")
