"""Speed levers against the plain path: the chunked loss (llm_finetune/loss.py) and compiled
decoder layers give the same losses and gradients."""

import pytest
import torch
import torch.nn.functional as F

from llm_finetune import finetuning, loss
from llm_finetune.model import decoder_layers
from tests.helpers import FAST


def plain(hidden, weight, bias, targets):
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_linear_cross_entropy_equals_logits_then_cross_entropy(monkeypatch, device, dtype,
                                                               tolerance):
    """Same loss and gradients (hidden, weight, bias) over several chunks, with ignored labels;
    bf16 to bf16 rounding of the gradients."""
    monkeypatch.setattr(loss, "CHUNK_TOKENS", 50)  # 7 chunks of the 300 label tokens
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 200, 32, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(500, 32, generator=gen) * 0.2).to(dtype).requires_grad_()
    bias = torch.randn(500, generator=gen).to(dtype).requires_grad_()
    targets = torch.randint(0, 500, (2, 200), generator=gen)
    targets[:, :50] = -100  # a prompt: no logits are computed for it
    hidden, weight, bias, targets = (t.detach().to(device).requires_grad_(t.requires_grad)
                                     for t in (hidden, weight, bias, targets))
    expected = plain(hidden, weight, bias, targets)
    expected_grads = torch.autograd.grad(expected, (hidden, weight, bias))
    got = loss.linear_cross_entropy(hidden, weight, bias, targets)
    got_grads = torch.autograd.grad(got * 3.0, (hidden, weight, bias))  # backward scales
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    for ours, reference in zip(got_grads, expected_grads):
        scale = reference.float().abs().max()
        assert (ours.float() / 3.0 - reference.float()).abs().max() <= tolerance * scale
    assert got_grads[0][:, :50].abs().sum() == 0  # ignored positions get no gradient


def test_linear_cross_entropy_without_gradients_only_sums():
    hidden, weight = torch.randn(1, 10, 8), torch.randn(20, 8)
    targets = torch.randint(0, 20, (1, 10))
    with torch.no_grad():
        assert loss.linear_cross_entropy(hidden, weight, None, targets).item() == \
            pytest.approx(plain(hidden, weight, None, targets).item(), rel=1e-6)


@pytest.mark.parametrize("settings", [{}, {"use_peft": True, "lr": 1e-2, "max_train_step": 6}],
                         ids=["full", "lora"])
def test_training_with_the_chunked_loss_equals_the_plain_loss(settings, tmp_path, monkeypatch):
    """In fp32 (on a GPU too), where the two differ only by summation order; --chunked_loss
    False really takes the plain path."""
    from llm_finetune import loss

    calls = []
    chunked_path = loss.loss_in_output_layer
    monkeypatch.setattr(loss, "loss_in_output_layer",
                        lambda *args: calls.append(1) or chunked_path(*args))
    runs = []
    for chunked in (True, False):
        calls.clear()
        runs.append(finetuning.main(**{**FAST, **settings}, chunked_loss=chunked,
                                    mixed_precision=False, output_dir=str(tmp_path / str(chunked))))
        assert bool(calls) == chunked
    chunked, plain_run = ([m["loss"] for m in r["metrics"] if "loss" in m] for r in runs)
    assert chunked == pytest.approx(plain_run, rel=1e-5)
    assert runs[0]["eval_loss"] == pytest.approx(runs[1]["eval_loss"], rel=1e-5)
    assert chunked[-1] < chunked[0]


@pytest.mark.parametrize("flags", [{}, {"use_peft": True, "quantization": "4bit", "lr": 1e-2,
                                      "quantization_config.compute_dtype": "float32"}],
                         ids=["full", "qlora"])
def test_compiled_layers_train_like_eager_ones(flags, tmp_path):
    """--torch_compile: each decoder layer compiled, bitsandbytes 4-bit layers included; same
    losses (fp32) on packed batches of a fixed shape, so one graph serves every step."""
    settings = {**FAST, "batching_strategy": "packing", "context_length": 128,
                "max_train_step": 2, "run_validation": False, "mixed_precision": False, **flags}
    runs = [finetuning.main(**settings, torch_compile=compiled,
                            output_dir=str(tmp_path / str(compiled))) for compiled in (True, False)]
    compiled, eager = ([m["loss"] for m in r["metrics"] if "loss" in m] for r in runs)
    assert compiled == pytest.approx(eager, rel=1e-5)
    layers = [decoder_layers(r["model"]) for r in runs]
    assert all(layer._compiled_call_impl is not None for layer in layers[0])
    assert all(layer._compiled_call_impl is None for layer in layers[1])


def test_models_that_post_process_logits_keep_the_plain_loss():
    from transformers import AutoConfig, AutoModelForCausalLM

    from llm_finetune.model import BUILTIN_MODELS

    config = AutoConfig.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert loss.output_layer(model) is model.lm_head
    config.final_logit_softcapping = 30.0  # Gemma 2: tanh capping after the projection
    assert loss.output_layer(model) is None
