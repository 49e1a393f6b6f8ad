"""The sampler and the shipped alpaca data."""

import pytest

from llm_finetune.config_utils import build_run_config
from llm_finetune.data.alpaca import load_alpaca
from llm_finetune.data.batching import GlobalBatchSampler, global_batch_problem
from llm_finetune.model import load_tokenizer


def rank_batches(world, batch, accumulation=1, epoch=0, n=103, group=True):
    lengths = [(i * 37) % 50 + 1 for i in range(n)]
    batches = []
    for rank in range(world):
        sampler = GlobalBatchSampler(lengths, batch, rank, world, shuffle=True, seed=3,
                                     group_by_length=group, accumulation=accumulation)
        sampler.set_epoch(epoch)
        batches.append(list(sampler))
        assert len(batches[-1]) == len(sampler)
    return batches


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_get_disjoint_shards_and_equal_step_counts(world):
    per_rank = rank_batches(world, batch=4)
    assert len({len(b) for b in per_rank}) == 1
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert len(seen) == len(set(seen)) == (103 // (4 * world)) * 4 * world


def test_same_steps_whatever_the_split():
    """N ranks x batch B == one process x batch N*B == one process x B with N accumulation."""
    def steps(per_rank, micro_per_step):
        merged = [sorted(sum((r[i] for r in per_rank), [])) for i in range(len(per_rank[0]))]
        return [sorted(sum(merged[i:i + micro_per_step], []))
                for i in range(0, len(merged), micro_per_step)]
    assert steps(rank_batches(2, 4), 1) == steps(rank_batches(1, 8), 1) \
        == steps(rank_batches(1, 4, accumulation=2), 2)


def test_shuffle_is_seeded_and_changes_with_epoch():
    assert rank_batches(2, 4, epoch=1) == rank_batches(2, 4, epoch=1)
    assert rank_batches(2, 4, epoch=1) != rank_batches(2, 4, epoch=2)


def test_alpaca_masks_the_prompt_and_ends_with_eos():
    run = build_run_config()
    tokenizer = load_tokenizer(run.train)
    rows = load_alpaca(run.dataset, tokenizer, "val", max_length=512, bad_rows="fail")
    assert len(rows) == 3000 // 20  # the shipped set's first 5%, as in llama-recipes
    sample = rows[0]
    masked = sample["labels"].index(next(x for x in sample["labels"] if x != -100))
    assert sample["input_ids"][0] == tokenizer.bos_token_id
    assert all(label == -100 for label in sample["labels"][:masked])
    assert sample["labels"][masked:] == sample["input_ids"][masked:]
    assert sample["input_ids"][-1] == tokenizer.eos_token_id
    prompt = tokenizer.decode(sample["input_ids"][1:masked])
    assert "### Instruction:" in prompt and prompt.endswith("### Response:\n")


def test_sampler_resumes_mid_epoch():
    lengths = [(i * 37) % 50 + 1 for i in range(103)]

    def sampler():
        return GlobalBatchSampler(lengths, 4, 0, 2, shuffle=True, seed=3, group_by_length=True)

    full = sampler()
    full.set_epoch(1)
    expected = list(full)
    interrupted = sampler()
    interrupted.set_epoch(1)
    stream = iter(interrupted)
    first = [next(stream) for _ in range(5)]
    state = interrupted.position(epoch=1, steps_done=5)  # what the trainer counted
    resumed = sampler()
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert first + list(resumed) == expected
    resumed.set_epoch(2)  # the next epoch starts from its beginning
    assert len(list(resumed)) == len(expected)
    with pytest.raises(ValueError, match="keep --seed"):
        GlobalBatchSampler(lengths, 4, 0, 2, shuffle=True, seed=4,
                           group_by_length=True).load_state_dict(state)
    # another split of the same global batch (8) resumes; another global batch does not
    GlobalBatchSampler(lengths, 2, 0, 2, shuffle=True, seed=3, group_by_length=True,
                       accumulation=2).load_state_dict(state)
    with pytest.raises(ValueError, match="keep --seed"):
        GlobalBatchSampler(lengths, 2, 0, 2, shuffle=True, seed=3,
                           group_by_length=True).load_state_dict(state)


def test_one_global_batch_rule():
    assert global_batch_problem(8, 2, 2, 2) is None and global_batch_problem(8, 8, 1, 1) is None
    assert "saved with 8 samples per optimizer step and this run has 4" in (
        global_batch_problem(8, 2, 2, 1))


def test_packing_keeps_every_sample_whole_and_wastes_little():
    """Best-fit decreasing packing: each sample once, unsplit, with its own positions; blocks
    of mixed short and long samples carry little padding (much less than filling blocks in data
    order)."""
    import random

    from llm_finetune.data.batching import pack_samples

    rng = random.Random(0)
    lengths = [rng.choice([5, 12, 30, 90, 200, 400]) for _ in range(600)]
    samples = [{"input_ids": [i % 1000 + 3] * n, "labels": [i % 1000 + 3] * n}
               for i, n in enumerate(lengths)]
    blocks = pack_samples(samples, context_length=512, pad_token_id=0)
    assert all(len(b["input_ids"]) == len(b["position_ids"]) == 512 for b in blocks)
    pieces = []
    for block in blocks:
        starts = [i for i, p in enumerate(block["position_ids"][:block["num_tokens"]]) if p == 0]
        bounds = starts + [block["num_tokens"]]
        pieces += [tuple(block["input_ids"][a:b]) for a, b in zip(bounds, bounds[1:])]
    assert sorted(pieces) == sorted(tuple(s["input_ids"]) for s in samples)
    in_order_blocks, room = 0, 0
    for n in lengths:  # blocks needed when filled in data order
        if n > room:
            in_order_blocks, room = in_order_blocks + 1, 512
        room -= n
    assert len(blocks) < 0.85 * in_order_blocks
    assert 1 - sum(lengths) / (512 * len(blocks)) < 0.06
