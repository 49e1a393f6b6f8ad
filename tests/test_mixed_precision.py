"""FSDP and one-process runs with the precision a GPU gets (bf16 or fp16 compute, fp32
masters), run on CPU: the dtype bugs of mixed precision show here, not only on a GPU.

``gpu_precision`` makes ``finetuning.main`` choose precision as on a bf16-capable GPU (and
accept fp16); FSDP's mixed-precision casts and peft's input casts then run on CPU exactly as
they do on CUDA. The GPU matrix (benchmarks/device_matrix.py) runs the same paths on a GPU.
"""

import math

import pytest
import torch

from llm_finetune import finetuning
from llm_finetune.preflight import validate
from llm_finetune.precision import choose_precision
from tests.helpers import FAST

STEPS = dict(FAST, max_train_step=4, lr=1e-2)


@pytest.fixture
def gpu_precision(monkeypatch):
    monkeypatch.setattr(finetuning, "choose_precision",
                        lambda run, cuda: choose_precision(run, True, bf16_supported=True))
    monkeypatch.setattr(finetuning, "validate",
                        lambda run, world_size, cuda: validate(run, world_size, True))


def losses(summary) -> list[float]:
    return [m["loss"] for m in summary["metrics"] if "loss" in m]


def dtypes(model, trainable: bool) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad == trainable}


@pytest.mark.parametrize("method,fp16", [("lora", False), ("llama_adapter", False),
                                         ("prefix", False), ("lora", True)])
def test_fsdp_adapters_train_with_mixed_precision(method, fp16, gpu_precision, tiny_model_dir,
                                                  tmp_path):
    """The design card's command (FSDP + LoRA, default precision) crashed at the first forward
    with 'expected mat1 and mat2 to have the same dtype' before adapters got their inputs in the
    compute dtype; the frozen base is stored in the compute dtype, the adapters in fp32."""
    # prefix tuning's KV cache does not survive activation checkpointing (refused with it on)
    checkpointing = {"fsdp_config.fsdp_activation_checkpointing": method != "prefix"}
    summary = finetuning.main(**STEPS, **checkpointing, model_name=str(tiny_model_dir),
                              enable_fsdp=True, use_peft=True, peft_method=method,
                              use_fp16=fp16, output_dir=str(tmp_path))
    got = losses(summary)
    assert len(got) == STEPS["max_train_step"] and all(math.isfinite(x) for x in got)
    assert min(got[-2:]) < got[0], f"{method}: the loss did not fall: {got}"
    compute = torch.float16 if fp16 else torch.bfloat16
    assert dtypes(summary["model"], trainable=False) == {compute}, "frozen base kept in fp32"
    assert dtypes(summary["model"], trainable=True) == {torch.float32}, "adapters lost fp32 masters"


@pytest.mark.parametrize("method,fp16", [("lora", True), ("llama_adapter", False)])
def test_one_process_adapters_over_a_low_precision_base(method, fp16, gpu_precision,
                                                        tiny_model_dir, tmp_path):
    """fp32 adapters over a base in the compute dtype, under autocast (llama_adapter feeds its
    fp32 prompt to the base's projections: without autocast, a dtype mismatch)."""
    summary = finetuning.main(**STEPS, model_name=str(tiny_model_dir), use_peft=True,
                              peft_method=method, use_fp16=fp16, output_dir=str(tmp_path))
    assert all(math.isfinite(x) for x in losses(summary))
    assert dtypes(summary["model"], trainable=False) == {torch.float16 if fp16 else torch.bfloat16}
    assert dtypes(summary["model"], trainable=True) == {torch.float32}


def test_full_fine_tuning_keeps_fp32_masters(gpu_precision, tiny_model_dir, tmp_path):
    summary = finetuning.main(**STEPS, model_name=str(tiny_model_dir), enable_fsdp=True,
                              output_dir=str(tmp_path))
    assert dtypes(summary["model"], trainable=True) == {torch.float32}
    got = losses(summary)
    assert got[-1] < got[0]


def test_freeze_layers_keeps_one_unit_per_layer(tiny_model_dir, tmp_path):
    """Full fine-tuning with frozen layers mixes nothing inside a unit: no unit per Linear."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    summary = finetuning.main(**dict(FAST, max_train_step=1), model_name=str(tiny_model_dir),
                              enable_fsdp=True, freeze_layers=True, num_freeze_layers=1,
                              output_dir=str(tmp_path))
    units = [m for m in summary["model"].modules() if isinstance(m, FullyShardedDataParallel)]
    layers = summary["model"].config.num_hidden_layers
    assert len(units) == layers + 1  # the decoder layers and the root


@pytest.mark.parametrize("weights", ["on disk", "random init"])
def test_fsdp_on_one_rank_with_a_tied_frozen_embedding_equals_one_process(
        weights, tied_model_dir, tied_config_dir, tmp_path):
    """Llama-3.2-1B ties its input embedding and output layer. Frozen under LoRA and unsharded
    (one rank), FSDP1 lost that shared weight after the first backward (the second step
    failed) and saving failed ('FSDP assumes ... is in the state_dict'); the frozen base is
    now left out of an unsharded FSDP. The saved adapter loads with plain peft."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = tied_model_dir if weights == "on disk" else tied_config_dir
    settings = dict(FAST, model_name=str(model), tokenizer_name="tiny-llama", use_peft=True,
                    lr=1e-2)
    sharded = finetuning.main(**dict(settings, save_model=True), enable_fsdp=True,
                              output_dir=str(tmp_path / "fsdp"))
    single = finetuning.main(**settings, output_dir=str(tmp_path / "one"))
    assert losses(sharded) == pytest.approx(losses(single), rel=1e-5)
    if weights == "on disk":
        base = AutoModelForCausalLM.from_pretrained(tied_model_dir)
        loaded = PeftModel.from_pretrained(base, sharded["saved_to"]).eval()
        probe = torch.randint(3, 1024, (2, 16), generator=torch.Generator().manual_seed(1))
        trained = sharded["model"].eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=probe).logits,
                                       trained(input_ids=probe).logits, rtol=1e-4, atol=1e-4)
