"""Batching: how samples become the tensors of one step, and which rank sees which samples.

The sampler decides which samples make up each optimizer step independently of how they are
split across ranks and accumulation steps, so N ranks with batch B, one process with batch N*B,
and one process with batch B and N accumulation steps train on the same data step for step:
that is what makes sharded training comparable with single-process training. Every rank gets
the same number of batches (samples that cannot fill a whole step are dropped), so no rank
waits forever at the end of an epoch.
"""

import bisect
import random

import torch
from torch.utils.data import Sampler


def global_batch(batch_size: int, world_size: int, accumulation: int) -> int:
    """Samples per optimizer step: the unit the data order is made of (see GlobalBatchSampler)."""
    return batch_size * world_size * accumulation


def global_batch_problem(saved: int, batch_size: int, world_size: int,
                         accumulation: int) -> str | None:
    """Why a data position saved with ``saved`` samples per step cannot be continued by this
    split, or None. The order is cut into step batches, so it resumes only with the same global
    batch; any split of it (world size, micro-batch, accumulation) works."""
    ours = global_batch(batch_size, world_size, accumulation)
    if saved == ours:
        return None
    return (f"saved with {saved} samples per optimizer step and this run has {ours} "
            f"({batch_size} per rank x {world_size} ranks x {accumulation} accumulation steps). "
            "The data order resumes only with the same global batch: another world size works "
            "when batch_size_training x ranks x gradient_accumulation_steps stays the same")


class GlobalBatchSampler(Sampler):
    """Yields this rank's micro-batches (lists of sample indices).

    Samples are grouped into *step batches* of ``batch_size * world_size * accumulation``: all
    the samples of one optimizer step. Each step batch is cut into ``accumulation``
    micro-batches, and each micro-batch into ``world_size`` slices, rank r taking the r-th.
    So the samples of every optimizer step are the same whatever the split between ranks,
    micro-batch size and accumulation steps. ``group_by_length`` sorts by length first (little
    padding), then shuffles whole step batches.
    """

    def __init__(self, lengths: list[int], batch_size: int, rank: int, world_size: int,
                 shuffle: bool, seed: int, group_by_length: bool, accumulation: int = 1):
        self.lengths = lengths
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length
        self.accumulation = accumulation
        self.epoch = 0
        self._resume_at = 0  # micro-batches of the epoch to skip on the next pass (resume)

    @property
    def step_size(self) -> int:
        return global_batch(self.batch_size, self.world_size, self.accumulation)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._resume_at = 0
        self.epoch = epoch

    def position(self, epoch: int, steps_done: int) -> dict:
        """The data stream's position for exact resume: the epoch and how many of its optimizer
        steps the trainer completed (the order itself is recomputed from seed and epoch).

        The trainer says how far it got: the sampler cannot know, because DataLoader workers
        ask it for batches ahead of the training loop (prefetching). Counted in steps, not this
        rank's micro-batches, so a run may resume with another split of the same global batch:
        other world size, micro-batch and accumulation."""
        return {"epoch": epoch, "steps": steps_done, "seed": self.seed,
                "step_size": self.step_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue at a ``position``: the next pass over this epoch skips its done steps."""
        problem = global_batch_problem(state["step_size"], self.batch_size, self.world_size,
                                       self.accumulation)
        if state["seed"] != self.seed or problem:
            raise ValueError(f"the data order was saved for seed {state['seed']} and "
                             f"{state['step_size']} samples per step, this run has seed "
                             f"{self.seed} and {self.step_size}: keep --seed and the global batch")
        self.epoch = state["epoch"]
        self._resume_at = state["steps"] * self.accumulation

    def step_batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        if self.group_by_length:
            order.sort(key=lambda i: self.lengths[i])  # stable: ties keep the shuffled order
        size = self.step_size
        batches = [order[i:i + size] for i in range(0, len(order) - size + 1, size)]
        if self.shuffle and self.group_by_length:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        micro = self.batch_size * self.world_size
        batches = [step[start:start + micro][self.rank::self.world_size]
                   for step in self.step_batches() for start in range(0, len(step), micro)]
        skip, self._resume_at = self._resume_at, 0
        yield from batches[skip:]

    def __len__(self) -> int:
        return len(self.lengths) // self.step_size * self.accumulation


def pad_collate(pad_token_id: int):
    """Right-pad input ids with ``pad_token_id`` and labels with -100 to the longest sample."""

    def collate(samples: list[dict]) -> dict:
        longest = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), longest), pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample["input_ids"])
            input_ids[row, :n] = torch.tensor(sample["input_ids"])
            labels[row, :n] = torch.tensor(sample["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                "num_tokens": attention_mask.sum()}

    return collate


def pack_samples(samples, context_length: int, pad_token_id: int) -> list[dict]:
    """Pack whole samples into blocks of ``context_length`` tokens, never splitting a sample.

    Best-fit decreasing: the longest samples are placed first, each into the block with the
    least room that still holds it. Filling blocks in data order instead leaves the tail of a
    block empty whenever the next sample is long (far more padding on data of mixed short and
    long answers: docs/datasets.md, benchmarks/batching.py).

    ``position_ids`` restart at 0 at each sample, and no attention mask is passed: transformers
    then builds a block-diagonal causal mask (SDPA/eager) or uses varlen flash-attention, so no
    token attends across a sample boundary. Each sample's first label is masked (-100): that
    label is what the previous token predicts, the last token of the sample before it in the
    block, so no loss term predicts one sample from another, whatever labels a custom data set
    gives its first token.
    """
    lengths = [len(s["input_ids"]) for s in samples]
    members: list[list[int]] = []  # sample indices per block
    rooms: list[tuple[int, int]] = []  # (room left, block index), sorted
    for index in sorted(range(len(samples)), key=lambda i: -lengths[i]):
        need = lengths[index]
        at = bisect.bisect_left(rooms, (need, -1))
        if at == len(rooms):
            members.append([])
            room, block = context_length, len(members) - 1
        else:
            room, block = rooms.pop(at)
        members[block].append(index)
        if room - need > 0:
            bisect.insort(rooms, (room - need, block))
    blocks = []
    for indices in members:
        ids, labels, positions = [], [], []
        for index in indices:
            ids += list(samples[index]["input_ids"])
            labels += [-100] + list(samples[index]["labels"][1:])
            positions += list(range(lengths[index]))
        pad = context_length - len(ids)
        blocks.append({"input_ids": ids + [pad_token_id] * pad, "labels": labels + [-100] * pad,
                       "position_ids": positions + list(range(pad)), "num_tokens": len(ids)})
    return blocks


# the batch key of a packed batch's sample starts (packed_collate)
SAMPLE_STARTS = "cu_seq_lens"


def packed_collate(samples: list[dict]) -> dict:
    """Blocks as tensors, with where each sample starts (``SAMPLE_STARTS``: what the varlen
    flash-attention kernel takes, computed here on the loader's side; attention.py)."""
    batch = {key: torch.tensor([s[key] for s in samples], dtype=torch.long)
             for key in ("input_ids", "labels", "position_ids")}
    batch["num_tokens"] = torch.tensor(sum(s["num_tokens"] for s in samples))
    batch[SAMPLE_STARTS] = sample_starts(batch["position_ids"])
    return batch


def sample_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Where each sample starts in the flattened batch, and its end: positions restart at 0 at
    each sample and each row starts a new one (a row's padding tail counts as a sample of its
    own; its labels are ignored). int32, as flash-attention takes them."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).reshape(-1)
    return torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
