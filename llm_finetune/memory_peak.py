"""What held the GPU's memory at its peak, read from a ``--memory_snapshot_step`` snapshot.

    python -m llm_finetune.memory_peak OUTPUT_DIR/memory_snapshot/rank0.pickle [--top 12]

The snapshot's allocator history is replayed event by event; at the moment the most memory
was allocated, the live allocations are grouped by where they were made (the innermost frames
in this library, transformers, peft or the optimizer) and listed largest first, with what was
being allocated when the peak was reached. Memory allocated before recording began (the
weights, mostly) is one line of its own. pytorch.org/memory_viz shows the same history as a
picture; this is the text a bug report or a planner check can quote.
"""

import argparse
import pickle
from collections import defaultdict
from pathlib import Path

GIB = 2**30
# frames worth naming a group by: the first frame (innermost first) from any of these paths
NAMED = ("llm_finetune/", "transformers/", "peft/", "torch/optim/", "torch/nn/parallel/",
         "torch/distributed/", "torch/utils/checkpoint", "bitsandbytes/")


def site(frames: list[dict], depth: int = 2) -> str:
    """Where an allocation was made: its first ``depth`` named frames, innermost first."""
    named = [f for f in frames if any(part in f["filename"] for part in NAMED)]
    shown = (named or frames)[:depth]
    if not shown:
        return "(no Python frame recorded)"
    return " <- ".join(f"{short_path(f['filename'])}:{f['line']} {f['name']}" for f in shown)


def short_path(filename: str) -> str:
    """From the package on: the same for an installed library and a source checkout."""
    for part in ("site-packages/", "dist-packages/"):
        if part in filename:
            return filename.split(part, 1)[1]
    if "llm_finetune/" in filename:
        return "llm_finetune/" + filename.rsplit("llm_finetune/", 1)[1]
    return filename


def replay(trace: list[dict]) -> tuple[int, int, dict[int, dict]]:
    """(index of the peak event, bytes allocated over the recording's start there, the live
    allocations there by address). Frees of memory allocated before recording are counted
    too, so the peak is relative to the allocated memory at the start."""
    total = peak = 0
    peak_at = -1
    for index, event in enumerate(trace):
        if event["action"] == "alloc":
            total += event["size"]
        elif event["action"] == "free_completed":
            total -= event["size"]
        if total > peak:
            peak, peak_at = total, index
    live: dict[int, dict] = {}
    for event in trace[:peak_at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    return peak_at, peak, live


def recorded_device(snapshot: dict) -> int:
    """The GPU whose history the snapshot holds: rank R's run records on its own GPU."""
    recorded = [index for index, trace in enumerate(snapshot["device_traces"]) if trace]
    return recorded[0] if recorded else 0


def summary(snapshot: dict, top: int = 12, device: int | None = None) -> str:
    device = recorded_device(snapshot) if device is None else device
    if not 0 <= device < len(snapshot["device_traces"]):
        raise ValueError(f"--device {device}: the snapshot has GPUs 0 to "
                         f"{len(snapshot['device_traces']) - 1}")
    trace = snapshot["device_traces"][device]
    if not trace:
        return (f"the snapshot holds no allocator history for GPU {device}: pass the --device "
                "its run recorded on, or record again with --memory_snapshot_step")
    allocated_now = sum(block["size"] for segment in snapshot["segments"]
                        if segment.get("device", device) == device
                        for block in segment["blocks"] if block["state"] == "active_allocated")
    net_recorded = sum(e["size"] if e["action"] == "alloc" else -e["size"]
                       for e in trace if e["action"] in ("alloc", "free_completed"))
    before = allocated_now - net_recorded
    peak_at, peak, live = replay(trace)
    if peak_at < 0:
        return (f"{before / GIB:.2f} GiB allocated before recording began; nothing allocated "
                "while recording rose above it")
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in live.values():
        group = groups[site(event.get("frames", []))]
        group[0] += event["size"]
        group[1] += 1
    lines = [f"peak: {(before + peak) / GIB:.2f} GiB allocated on GPU {device}, at allocator "
             f"event {peak_at} of {len(trace)}",
             f"  {before / GIB:.2f} GiB allocated before recording began (weights, and what "
             "earlier steps kept)"]
    recorded_live = sum(size for size, _ in groups.values())
    freed_before = peak - recorded_live  # negative: memory from before recording was freed
    if abs(freed_before) >= GIB / 100:
        lines.append(f"  {freed_before / GIB:+.2f} GiB: memory allocated before recording, "
                     "freed before the peak")
    lines.append(f"  {recorded_live / GIB:.2f} GiB allocated while recording and live at the "
                 "peak, by where it was allocated:")
    for where, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"    {size / GIB:7.2f} GiB in {count:5d} allocation{'s' if count > 1 else ' '}"
                     f"  {where}")
    if len(groups) > top:
        rest = sum(size for size, _ in sorted(groups.values(), reverse=True)[top:])
        lines.append(f"    {rest / GIB:7.2f} GiB elsewhere ({len(groups) - top} more places)")
    lines.append("the allocation that reached the peak: "
                 + site(trace[peak_at].get("frames", []), depth=4))
    return "\n".join(lines)


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llm_finetune.memory_peak",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("snapshot", type=Path, help="a --memory_snapshot_step pickle")
    parser.add_argument("--top", type=int, default=12, help="places listed (default: 12)")
    parser.add_argument("--device", type=int, default=None,
                        help="the GPU whose history to read (default: the one recorded)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = command_line().parse_args(argv)
    if not args.snapshot.is_file():
        raise SystemExit(f"{args.snapshot}: no such file (a run with --memory_snapshot_step N "
                         "writes OUTPUT_DIR/memory_snapshot/rankR.pickle)")
    try:
        snapshot = pickle.loads(args.snapshot.read_bytes())
        print(summary(snapshot, args.top, args.device))
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as error:
        raise SystemExit(f"{args.snapshot}: not a CUDA memory snapshot ({error}); a run with "
                         "--memory_snapshot_step N writes one") from None
    except ValueError as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
