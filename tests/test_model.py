"""Model loading and the FSDP wrap policy across model families."""

import pytest
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from llm_finetune.config_utils import build_run_config
from llm_finetune.distributed import setup
from llm_finetune.engine import enable_activation_checkpointing, wrap_fsdp
from llm_finetune.adapters import apply_peft
from llm_finetune.model import (BUILTIN_MODELS, decoder_layer_classes, decoder_layers, has_weights,
                                load_model)
from llm_finetune.random_init import SeededInit

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("config_cls,layer_name", [
    (LlamaConfig, "LlamaDecoderLayer"), (Qwen2Config, "Qwen2DecoderLayer"),
    (MistralConfig, "MistralDecoderLayer")])
def test_decoder_layer_class_is_found_per_family(config_cls, layer_name):
    model = AutoModelForCausalLM.from_config(config_cls(**SMALL))
    assert [c.__name__ for c in decoder_layer_classes(model)] == [layer_name]


@pytest.fixture
def one_rank_group():
    info, created = setup(need_group=True)
    yield info
    if created:
        dist.destroy_process_group()


@pytest.mark.parametrize("config_cls", [LlamaConfig, Qwen2Config])
def test_fsdp_wraps_one_unit_per_decoder_layer(config_cls, one_rank_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = AutoModelForCausalLM.from_config(config_cls(**SMALL))
    run = build_run_config(enable_fsdp=True)
    wrapped = wrap_fsdp(model, run.fsdp, one_rank_group, torch.float32)
    units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
    assert len(units) == SMALL["num_hidden_layers"] + 1  # each layer, plus the root
    assert all(type(u.module) in decoder_layer_classes(model) for u in units[1:])


def test_fsdp_gives_frozen_base_weights_no_gradient(one_rank_group):
    """With LoRA, adapters get FSDP units of their own: the decoder layers' units hold only
    frozen weights, so FSDP allocates no gradient for them (a mixed unit gets one gradient the
    size of all its weights), and a backward pass leaves gradients on the adapters only."""
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = get_peft_model(AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    run = build_run_config(enable_fsdp=True)
    wrapped = wrap_fsdp(model, run.fsdp, one_rank_group, torch.float32)
    units = [m for m in wrapped.modules() if isinstance(m, FSDP)]
    layer_units = [u for u in units if type(u.module) in decoder_layer_classes(model)]
    adapter_units = [u for u in units if type(u.module) is torch.nn.Linear]  # lora_A, lora_B
    assert len(layer_units) == SMALL["num_hidden_layers"]
    assert len(adapter_units) == 4 * SMALL["num_hidden_layers"]  # A and B of q and v
    wrapped(input_ids=torch.randint(0, 128, (2, 16))).logits.sum().backward()
    for unit in layer_units:  # unsharded (one rank) FSDP leaves the frozen base out: no handle
        assert unit._handle is None or (not unit._handle.flat_param.requires_grad
                                        and unit._handle.flat_param.grad is None)
    lora = [p for n, p in wrapped.named_parameters() if "lora_" in n]
    frozen = [p for n, p in wrapped.named_parameters() if "lora_" not in n]
    assert lora and all(p.grad is not None for p in lora)
    assert frozen and all(p.grad is None for p in frozen)


def saved_activation_bytes(model, input_ids) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids).logits.sum()
    return total


def test_activation_checkpointing_really_drops_activations():
    config = LlamaConfig(**SMALL)
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(config).train()
    checkpointed = AutoModelForCausalLM.from_config(config).train()
    enable_activation_checkpointing(checkpointed)
    ids = torch.randint(0, 128, (2, 64))
    assert saved_activation_bytes(checkpointed, ids) < 0.5 * saved_activation_bytes(plain, ids)


def test_selective_checkpointing_keeps_the_last_layers_activations():
    """Saved activations grow by one layer's worth for each layer kept out of checkpointing,
    and the gradients stay those of the plain model."""
    config = LlamaConfig(**SMALL)
    torch.manual_seed(0)
    models = [AutoModelForCausalLM.from_config(config).train() for _ in range(3)]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())
    enable_activation_checkpointing(models[1])
    enable_activation_checkpointing(models[2], keep_last=1)
    ids = torch.randint(0, 128, (2, 64))
    full, all_checkpointed, kept_one = (saved_activation_bytes(m, ids) for m in models)
    per_layer = (full - all_checkpointed) / config.num_hidden_layers
    assert kept_one - all_checkpointed == pytest.approx(per_layer, rel=0.3)
    grads = []
    for model in (models[0], models[2]):
        model(input_ids=ids).logits.float().pow(2).mean().backward()
        grads.append(model.model.layers[0].mlp.up_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_no_checkpoint_layers_reaches_the_model(tmp_path):
    from llm_finetune import finetuning
    from tests.helpers import FAST

    summary = finetuning.main(**{**FAST, "max_train_step": 1}, run_validation=False,
                              output_dir=str(tmp_path), **{"fsdp_config.no_checkpoint_layers": 1})
    flags = [layer.gradient_checkpointing for layer in decoder_layers(summary["model"])]
    assert flags == [True] * (len(flags) - 1) + [False]


def test_builtin_model_is_random_init_from_config_and_in_train_mode():
    run = build_run_config()
    assert not has_weights("llm_finetune/assets/tiny-llama")
    model = load_model(run.train, torch.float32, on_meta=False)
    assert model.training
    again = load_model(run.train, torch.float32, on_meta=False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_saved_model_loads_in_train_mode(tiny_model_dir):
    run = build_run_config(model_name=str(tiny_model_dir))
    model = load_model(run.train, torch.float32, on_meta=False)
    assert model.training and all(m.training for m in model.modules())


def test_meta_load_allocates_nothing(tiny_model_dir):
    run = build_run_config(model_name=str(tiny_model_dir))
    model = load_model(run.train, torch.float32, on_meta=True)
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("name,billions", [("llama3.2-1b", 1.236), ("llama3-8b", 8.030),
                                            ("llama3-70b", 70.554), ("qwen2.5-7b", 7.616),
                                            ("llama3.2-11b-vision", 10.670)])
def test_builtin_shapes_have_the_real_parameter_counts(name, billions):
    run = build_run_config(model_name=name)
    model = load_model(run.train, torch.bfloat16, on_meta=True)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.002)


def test_builtin_shape_needs_a_tokenizer_name():
    from llm_finetune.model import load_tokenizer

    with pytest.raises(ValueError, match="--tokenizer_name"):
        load_tokenizer(build_run_config(model_name="llama3-8b").train)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_seeded_init_follows_the_architecture_scheme(family):
    """A random-init model built on meta and filled by SeededInit has transformers' own init:
    the real rotary table, norms at one, linear weights at the config's std; adding LoRA does
    not change the base weights, and the training RNG stream is not consumed."""
    if family == "llama":
        config = AutoConfig.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    else:
        config = Qwen2Config(**SMALL)
    reference = AutoModelForCausalLM.from_config(config)
    state = torch.random.get_rng_state()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    SeededInit(model, seed=3, device="cpu")(model)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    torch.testing.assert_close(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    q = model.model.layers[0].self_attn.q_proj.weight
    assert q.std().item() == pytest.approx(config.initializer_range, rel=0.1)

    with torch.device("meta"):
        with_lora = AutoModelForCausalLM.from_config(config)
    run = build_run_config(use_peft=True, model_name="tiny-llama")
    with_lora = apply_peft(with_lora, run, config.num_hidden_layers)
    SeededInit(with_lora, seed=3, device="cpu")(with_lora)
    base = with_lora.get_base_model()
    assert torch.equal(base.model.layers[1].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(base.model.layers[1].self_attn.q_proj.base_layer.weight,
                       model.model.layers[1].self_attn.q_proj.weight)
    lora_q = base.model.layers[1].self_attn.q_proj
    assert lora_q.lora_B["default"].weight.abs().sum() == 0
    assert lora_q.lora_A["default"].weight.abs().sum() > 0


def test_fast_kernels_choose_flex_attention_for_packed_batches_on_a_gpu(monkeypatch):
    """--use_fast_kernels: flash-attention 2 when installed, else flex attention for packed
    batches (measured faster than SDPA's dense mask), else SDPA; never on a CPU."""
    import importlib.util

    from llm_finetune import model as model_module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    choose = model_module.attention_implementation
    assert choose(True, packing=True) == "flex_attention"
    assert choose(True, packing=False) == "sdpa"
    assert choose(False, packing=True) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert choose(True, packing=True) == "flash_attention_2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose(True, packing=True) == "sdpa"


def test_random_init_4bit_equals_quantising_the_same_weights_from_disk(tmp_path):
    """A config-only model with --quantization 4bit: each linear layer is initialised and
    quantised in turn; the result equals transformers' from_pretrained quantisation of the
    same seeded weights saved to disk, and LoRA trains on it."""
    from transformers import BitsAndBytesConfig

    from llm_finetune import finetuning
    from llm_finetune.model import keep_4bit_layout_on_cpu
    from llm_finetune.quantization import to_4bit_layers

    config = AutoConfig.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32,
                               llm_int8_skip_modules=["lm_head"])
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config)
    SeededInit(full, seed=5, device="cpu")(full)
    full.save_pretrained(tmp_path / "seeded")
    from_disk = AutoModelForCausalLM.from_pretrained(tmp_path / "seeded", quantization_config=quant,
                                                     device_map={"": "cpu"})
    with torch.device("meta"):
        direct = AutoModelForCausalLM.from_config(config)
    to_4bit_layers(direct, quant, torch.float32)
    SeededInit(direct, seed=5, device="cpu")(direct)
    keep_4bit_layout_on_cpu(from_disk)
    keep_4bit_layout_on_cpu(direct)
    assert type(direct.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(direct(input_ids=ids).logits, from_disk(input_ids=ids).logits)

    summary = finetuning.main(model_name="tiny-llama", use_peft=True, quantization="4bit",
                              max_train_step=6, lr=1e-2, run_validation=False, save_model=False,
                              num_workers_dataloader=0, plot_metrics=False,
                              output_dir=str(tmp_path / "run"))
    losses = [m["loss"] for m in summary["metrics"] if "loss" in m]
    assert losses[-1] < losses[0]
