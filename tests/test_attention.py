"""The packed-batch attention (llm_finetune/attention.py): the sample starts the collator
computes, the kwargs that reach every layer, and the losses and gradients of a packed batch
equal to SDPA with transformers' block-diagonal mask. PyTorch's varlen kernel is CUDA-only, so
here a reference with its contract (per-sample causal attention over the flattened batch) stands
in for it; on the GPU the kernel itself is checked against SDPA (tests/test_gpu.py and
benchmarks/compare.py --check, docs/performance.md)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from llm_finetune import attention, loss
from llm_finetune.data.batching import SAMPLE_STARTS, pack_samples, packed_collate
from llm_finetune.model import BUILTIN_MODELS

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference_varlen(query, key, value, starts_q, starts_k, max_q, max_k, scale):
    """Causal attention within each [start, next start) of the flattened tokens; like the
    kernel, half-precision inputs of one dtype only."""
    assert query.dtype == key.dtype == value.dtype and query.dtype in (torch.float16,
                                                                       torch.bfloat16)
    out = torch.empty_like(query)
    groups = query.shape[1] // key.shape[1]
    for begin, end in zip(starts_q[:-1].tolist(), starts_q[1:].tolist()):
        assert end - begin <= max_q
        q, k, v = (t[begin:end].transpose(0, 1) for t in (query, key, value))
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        out[begin:end] = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                        scale=scale).transpose(0, 1)
    return out


@pytest.fixture(params=[torch.float32, torch.bfloat16])
def packed_model(monkeypatch, request):
    """SDPA and the packed attention, same weights. In bf16 the packed attention runs the
    kernel (here the reference, its calls counted); in fp32, which flash-attention cannot
    compute, SDPA with the samples' block-diagonal mask."""
    calls = []

    def counted(*args):
        calls.append(1)
        return reference_varlen(*args)

    monkeypatch.setattr(attention, "_varlen_call", lambda: counted)
    monkeypatch.setattr(attention, "_VARLEN", None)
    attention.register()

    def config():
        return AutoConfig.from_pretrained(BUILTIN_MODELS["tiny-llama"])

    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(config(), attn_implementation="sdpa",
                                            dtype=request.param)
    packed = AutoModelForCausalLM.from_config(config(), dtype=request.param,
                                              attn_implementation=attention.PACKED_ATTENTION)
    packed.load_state_dict(sdpa.state_dict())
    return sdpa, packed, calls


def packed_batch(lengths_per_row, context: int = 64) -> dict:
    generator = torch.Generator().manual_seed(1)
    samples = [{"input_ids": torch.randint(3, 1000, (n,), generator=generator).tolist(),
                "labels": torch.randint(3, 1000, (n,), generator=generator).tolist()}
               for n in lengths_per_row]
    return packed_collate(pack_samples(samples, context, pad_token_id=0))


def test_sample_starts_mark_each_sample_and_each_row():
    batch = packed_batch([40, 20, 30, 10, 25])
    starts = batch[SAMPLE_STARTS]
    positions = batch["position_ids"].reshape(-1)
    assert starts.dtype == torch.int32 and starts[-1] == positions.numel()
    assert all(positions[s] == 0 for s in starts[:-1].tolist())
    assert int((positions == 0).sum()) == len(starts) - 1  # every start, nothing else
    assert set(range(0, positions.numel(), 64)) <= set(starts.tolist())  # rows start anew


def test_packed_attention_gives_sdpa_s_losses_and_gradients(packed_model):
    sdpa, packed, kernel_calls = packed_model
    batch = packed_batch([40, 20, 30, 10, 25, 60])
    assert loss.model_inputs(sdpa, batch).keys() == {"input_ids", "position_ids"}
    assert "cu_seq_lens_q" in loss.model_inputs(packed, batch)
    results = []
    for model in (sdpa, packed):
        total, tokens = loss.token_loss_sum(model, batch)
        total.backward()
        results.append((total.detach(), [p.grad.clone() for p in model.parameters()]))
    (expected, expected_grads), (got, got_grads) = results
    assert bool(kernel_calls) == (sdpa.dtype == torch.bfloat16)  # which path ran
    tolerance = 1e-5 if sdpa.dtype == torch.float32 else 1e-2  # bf16: rounding only
    assert torch.allclose(got, expected, rtol=tolerance)
    for a, b in zip(got_grads, expected_grads):
        assert (a - b).abs().max() <= 10 * tolerance * b.abs().max(), (a - b).abs().max()


def test_a_sample_cannot_see_the_one_before_it(packed_model):
    """Changing the first sample of a block leaves the second sample's logits as they were."""
    _, packed, _ = packed_model
    batch = packed_batch([30, 20])
    other = {k: v.clone() for k, v in batch.items()}
    other["input_ids"][0, :5] += 1
    second = slice(30, 50) if batch["position_ids"][0, 30] == 0 else slice(20, 50)
    logits = [packed(**loss.model_inputs(packed, b)).logits[0, second] for b in (batch, other)]
    assert torch.equal(logits[0], logits[1])


def test_generation_without_sample_starts_equals_sdpa(packed_model):
    """Greedy decoding (a cache; a left-padded batch) falls back to SDPA with the masks built
    here: the same tokens as transformers' SDPA."""
    sdpa, packed, _ = packed_model
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    outputs = [model.eval().generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                     do_sample=False, pad_token_id=0)
               for model in (sdpa, packed)]
    assert torch.equal(outputs[0], outputs[1])


@CUDA
def test_the_cuda_kernel_equals_the_reference():
    attention.register()
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(96, 8, 64, generator=generator).cuda().bfloat16()
    k, v = (torch.randn(96, 2, 64, generator=generator).cuda().bfloat16() for _ in range(2))
    starts = torch.tensor([0, 30, 50, 64, 96], dtype=torch.int32, device="cuda")
    got = attention._VARLEN(q, k, v, starts, starts, 64, 64, 0.125)
    expected = reference_varlen(q, k, v, starts, starts, 64, 64, 0.125)
    assert torch.allclose(got.float(), expected.float(), atol=2e-2)


def test_fp32_weights_under_autocast_run_the_kernel_in_autocast_s_dtype(packed_model):
    """Mixed precision with fp32 weights: the rotary embedding leaves q and k in fp32 and v in
    bf16 (what crashed the kernel on a GPU); the kernel gets all three in autocast's dtype."""
    sdpa, packed, kernel_calls = packed_model
    if sdpa.dtype != torch.float32:
        pytest.skip("the fp32-weights case")
    batch = packed_batch([40, 20, 30])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = loss.token_loss_sum(sdpa, batch)
        got, _ = loss.token_loss_sum(packed, batch)
    assert kernel_calls and torch.allclose(got, expected, rtol=1e-2)


def test_a_ddp_wrapped_model_still_gets_its_sample_starts(packed_model, tmp_path):
    """DDP hides the model's config: the loss looks inside the wrapper, or packed samples
    would see each other (found in review: every packed DDP run on a GPU)."""
    _, packed, _ = packed_model
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous",
                                         rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(packed)
        assert "cu_seq_lens_q" in loss.model_inputs(wrapped, packed_batch([30, 20]))
    finally:
        torch.distributed.destroy_process_group()


def test_a_training_forward_without_sample_starts_is_refused(packed_model):
    _, packed, _ = packed_model
    batch = packed_batch([30, 20])
    with pytest.raises(RuntimeError, match="sample starts"):
        packed.train()(input_ids=batch["input_ids"], position_ids=batch["position_ids"])


@pytest.mark.parametrize("setting", [{"sliding_window": 512}, {"attn_logit_softcapping": 50.0},
                                     {"attention_dropout": 0.1}])
def test_models_the_kernel_would_compute_wrong_keep_flex_attention(setting):
    config = AutoConfig.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    assert attention.supports(config)
    for name, value in setting.items():
        setattr(config, name, value)
    assert not attention.supports(config)
