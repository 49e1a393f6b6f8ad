"""Preference optimisation, ``--method dpo`` (issue #19): the loss against its formula, the
reference model, learning on held-out pairs, exact resume, the saved adapter, the data, the plan,
and bad input refused before the model loads. FSDP and DDP against one process are cases of the
one torchrun launch of tests/test_distributed.py."""

import json
import math
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from llm_finetune import finetuning, plan
from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.preflight import validate
from llm_finetune.data.loaders import load_dataset_split
from llm_finetune.data.pairs import pair_collate
from llm_finetune.loss import output_layer
from llm_finetune.model import load_tokenizer
from llm_finetune.preference import AdaptersOff, PreferenceLoss
from tests.helpers import DPO, FAST, probe_input
from tests.test_faults import cli_error, no_model_load, write_jsonl  # noqa: F401 (a fixture)
from tests.test_mixed_precision import gpu_precision  # noqa: F401 (a fixture)

BETA = 0.5
LOG_2 = math.log(2)


def hand_made_batch() -> dict:
    """Two pairs as the collate lays them out: chosen rows, then rejected rows, right-padded;
    prompts (shared by a pair's two rows) and padding are -100."""
    gen = torch.Generator().manual_seed(3)
    lengths, prompts = [12, 9, 10, 14], [5, 4, 5, 4]
    input_ids = torch.full((4, 14), 2)
    labels = torch.full((4, 14), -100)
    attention_mask = torch.zeros((4, 14), dtype=torch.long)
    for row, (length, prompt) in enumerate(zip(lengths, prompts)):
        ids = torch.randint(3, 1000, (length,), generator=gen)
        ids[:prompt] = input_ids[row - 2, :prompt] if row >= 2 else ids[:prompt]
        input_ids[row, :length] = ids
        labels[row, prompt:length] = ids[prompt:]
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "num_tokens": attention_mask.sum()}


def lora_model(model_dir, trained: bool, dropout: float = 0.0):
    """LoRA on the tiny model: at initialisation (B = 0, the policy is the base) or with
    random B, as after some training."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"],
                                            lora_dropout=dropout))
    if trained:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    return model.train()


def independent_log_probs(model, batch) -> torch.Tensor:
    """Logits, log-softmax, the label's entry, summed over labelled tokens: per sequence."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    log_probs = logits[:, :-1].float().log_softmax(-1)
    taken = log_probs.gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    return (taken * (labels != -100)).sum(1)


def formula(policy, reference, tokens, loss_type) -> torch.Tensor:
    chosen, rejected = (policy - reference).chunk(2)
    if loss_type == "ipo":
        chosen_tokens, rejected_tokens = tokens.chunk(2)
        return ((chosen / chosen_tokens - rejected / rejected_tokens) - 1 / (2 * BETA)) ** 2
    margin = BETA * (chosen - rejected)
    if loss_type == "hinge":
        return torch.clamp(1 - margin, min=0)
    return torch.log1p(torch.exp(-margin))  # -log(sigmoid(margin))


# 1. the loss and its reference model

@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "logits"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_loss_and_gradients_equal_the_formula(loss_type, chunked, tiny_model_dir):
    batch = hand_made_batch()
    model = lora_model(tiny_model_dir, trained=True)
    head = output_layer(model) if chunked else None
    objective = PreferenceLoss(model, AdaptersOff(model, head), BETA, loss_type, chunked)
    assert (objective.head is not None) == chunked
    loss, pairs, sums = objective(model, batch)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, trainable)

    policy = independent_log_probs(model, batch)
    with torch.no_grad(), model.disable_adapter():
        reference = independent_log_probs(model, batch)
    tokens = (batch["labels"][:, 1:] != -100).sum(1)
    expected = formula(policy, reference, tokens, loss_type)
    expected_grads = torch.autograd.grad(expected.sum(), trainable)
    assert pairs == 2
    assert loss.item() == pytest.approx(expected.sum().item(), rel=1e-5)
    assert loss.item() > 0.1 and not math.isclose(loss.item(), 2 * LOG_2, rel_tol=1e-3)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    rewards = BETA * (policy - reference).detach()
    chosen, rejected = rewards.chunk(2)
    assert sums["rewards_chosen"].item() == pytest.approx(chosen.sum().item(), rel=1e-4)
    assert sums["rewards_rejected"].item() == pytest.approx(rejected.sum().item(), rel=1e-4)
    assert sums["reward_margin"].item() == pytest.approx((chosen - rejected).sum().item(),
                                                         rel=1e-4)
    assert sums["reward_accuracy"].item() == (chosen > rejected).sum().item()


@pytest.mark.parametrize("use_peft", [True, False], ids=["lora", "full"])
def test_at_initialisation_the_policy_is_its_reference(use_peft, tiny_model_dir):
    """The run's objective (``objective_of``): LoRA starts with B = 0, full fine-tuning with a
    copy of itself, so every margin is 0: the loss is log 2 per pair and no pair counts as
    right. Once the policy moves, a full fine-tuning reference (a frozen copy) stays."""
    run = build_run_config(model_name=str(tiny_model_dir), use_peft=use_peft, **DPO)
    model = lora_model(tiny_model_dir, trained=False, dropout=0.1) if use_peft else \
        AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    objective = finetuning.objective_of(run, model)
    batch = hand_made_batch()
    loss, pairs, sums = objective(model, batch)
    assert loss.item() / pairs == pytest.approx(LOG_2, rel=1e-6)
    assert sums["reward_accuracy"].item() == 0 and sums["reward_margin"].item() == 0
    if use_peft:
        return
    reference = objective.reference.log_probs(model, batch)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    torch.testing.assert_close(objective.reference.log_probs(model, batch), reference,
                               rtol=0, atol=0)
    assert not any(p.requires_grad for p in objective.reference.model.parameters())
    assert objective(model, batch)[0].item() / pairs != pytest.approx(LOG_2, rel=1e-3)


def test_reference_forward_has_no_dropout_and_draws_no_random_numbers(tiny_model_dir):
    """With dropout in the model, the policy's log-probabilities vary from call to call and the
    reference's do not; the reference forward leaves the RNG and every module's mode as they
    were (the policy's dropout masks, and an exact resume, do not depend on it)."""
    model = lora_model(tiny_model_dir, trained=True, dropout=0.3)
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.3
    batch = hand_made_batch()
    reference = AdaptersOff(model, output_layer(model))
    rng = torch.get_rng_state()
    first = reference.log_probs(model, batch)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(reference.log_probs(model, batch), first)
    assert all(module.training for module in model.modules())
    with torch.no_grad():
        assert not torch.equal(independent_log_probs(model, batch),
                               independent_log_probs(model, batch))


# 2. training: rewards on held-out pairs, the saved adapter, exact resume

@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory):
    """LoRA DPO on the shipped pairs, evaluated on 40 held-out ones."""
    out = tmp_path_factory.mktemp("dpo")
    settings = dict(model_name=str(tiny_model_dir), use_peft=True, lr=3e-2, dpo_beta=BETA,
                    max_train_step=40, batch_size_training=8, val_batch_size=8, max_eval_step=0,
                    save_model=True, output_dir=str(out), **{"file_dataset.val_split": 0.05})
    summary = finetuning.main(**{**FAST, **DPO, **settings})
    return summary, out


def mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def test_lora_dpo_learns_the_preferences_of_held_out_pairs(dpo_run):
    summary, out = dpo_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    (evaluation,) = [r for r in records if "eval_loss" in r]
    assert len(steps) == 40
    assert {"rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= set(steps[0])
    assert steps[0]["loss"] == pytest.approx(LOG_2, rel=1e-6)  # policy == reference
    assert steps[0]["reward_accuracy"] == 0
    # batches group pairs of one length, often of one task: single steps are noisy
    first, rest = steps[:10], steps[10:]
    assert mean(rest, "reward_margin") > 2 * mean(first, "reward_margin") > 0
    assert mean(rest, "loss") < mean(first, "loss") < LOG_2
    # held out: at initialisation every margin is 0 (accuracy 0, loss log 2)
    assert evaluation["eval_reward_accuracy"] >= 0.7
    assert evaluation["eval_reward_margin"] > 0.5
    assert evaluation["eval_rewards_chosen"] > evaluation["eval_rewards_rejected"]
    assert evaluation["eval_loss"] < LOG_2 - 0.1
    assert "eval_perplexity" not in evaluation  # exp of a DPO loss is no perplexity
    assert summary["eval_reward_accuracy"] == [evaluation["eval_reward_accuracy"]]


def test_dpo_adapter_loads_with_plain_peft(dpo_run, tiny_model_dir):
    summary, out = dpo_run
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, out).eval()
    trained = summary["model"].eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe_input()).logits,
                                   trained(input_ids=probe_input()).logits)


@pytest.mark.parametrize("extra", [
    {"use_peft": True, "lora_config.lora_dropout": 0.1},  # dropout: the RNG state resumes
    {},  # full fine-tuning: the reference copies the base, not the restored weights
], ids=["lora", "full"])
def test_stopped_and_resumed_dpo_run_continues_the_same_curve(extra, tiny_model_dir, tmp_path):
    kwargs = {**FAST, **DPO, **extra, "model_name": str(tiny_model_dir), "max_train_step": 6,
              "run_validation": False, "warmup_steps": 2}

    def metrics(summary):
        return [{k: m[k] for k in ("loss", "reward_margin", "reward_accuracy")}
                for m in summary["metrics"] if "loss" in m]

    straight = metrics(finetuning.main(**kwargs, output_dir=str(tmp_path / "straight")))
    first = finetuning.main(**{**kwargs, "max_train_step": 3}, save_steps=3,
                            output_dir=str(tmp_path / "resumed"))
    assert metrics(first) == straight[:3]
    resumed = finetuning.main(**kwargs, resume_from_checkpoint="auto",
                              output_dir=str(tmp_path / "resumed"))
    assert metrics(resumed) == straight[3:]  # bitwise: one process on CPU


@pytest.mark.parametrize("settings", [
    {"enable_fsdp": True, "use_peft": True},  # FSDP's bf16 casts, the reference through them
    {"use_peft": True, "use_fp16": True},  # fp16 autocast and the loss scaler
    {},  # full fine-tuning under bf16 autocast, an fp32 frozen copy
], ids=["fsdp-lora-bf16", "lora-fp16", "full-bf16"])
def test_dpo_with_a_gpus_precision(settings, gpu_precision, tiny_model_dir, tmp_path):
    """Precision as on a bf16 GPU, run on CPU: the policy and its reference still agree at the
    first step (log 2), and the steps stay finite."""
    summary = finetuning.main(**{**FAST, **DPO, **settings, "lr": 1e-2},
                              model_name=str(tiny_model_dir), output_dir=str(tmp_path))
    steps = [m for m in summary["metrics"] if "loss" in m]
    assert steps[0]["loss"] == pytest.approx(LOG_2, rel=1e-6)
    assert all(math.isfinite(m[k]) for m in steps for k in ("loss", "reward_margin"))
    assert math.isfinite(summary["eval_loss"][0])


# 3. data: the two forms, truncation, the collate

PAIRS = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}", "rejected": f"{2 * i + 1}"}
         for i in range(20)]
CONVERSATIONS = [{"prompt": [{"role": "user", "content": f"What is {i} + 1?"},
                             {"role": "assistant", "content": "Let me think."},
                             {"role": "user", "content": "Go on."}],
                  "chosen": [{"role": "assistant", "content": f"It is {i + 1}."}],
                  "rejected": [{"role": "assistant", "content": f"It is {i + 2}."}]}
                 for i in range(20)]


def pairs_of(path, split="train", **settings):
    run = build_run_config(**{**DPO, "file_dataset.data_files": str(path)},
                           **{"file_dataset.val_split": 0.25}, **settings)
    tokenizer = load_tokenizer(run.train)
    return load_dataset_split(run, tokenizer, split), tokenizer


def learned(tokenizer, ids, labels) -> str:
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != -100])


def test_conversational_pairs_learn_only_the_responses(tmp_path):
    samples, tokenizer = pairs_of(write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS))
    assert len(samples) == 15
    pair = samples[0]
    chosen = learned(tokenizer, pair["chosen_input_ids"], pair["chosen_labels"])
    rejected = learned(tokenizer, pair["rejected_input_ids"], pair["rejected_labels"])
    assert chosen.startswith("<s>assistant\nIt is ") and chosen.rstrip().endswith("</s>")
    assert "Let me think" not in chosen + rejected  # the prompt's own assistant turn
    assert "Let me think" in tokenizer.decode(pair["chosen_input_ids"])
    prompt = sum(label == -100 for label in pair["chosen_labels"])
    assert pair["chosen_input_ids"][:prompt] == pair["rejected_input_ids"][:prompt]
    assert chosen != rejected


def test_text_pairs_keep_the_prompt_and_cut_the_response(tmp_path):
    rows = [dict(row, chosen=row["chosen"] + " and so on" * 20) for row in PAIRS]
    samples, tokenizer = pairs_of(write_jsonl(tmp_path / "long.jsonl", rows), context_length=24)
    pair = samples[0]
    assert len(pair["chosen_input_ids"]) == 24 and len(pair["rejected_input_ids"]) < 24
    masked = [i for i, label in zip(pair["chosen_input_ids"], pair["chosen_labels"])
              if label == -100]
    assert tokenizer.decode(masked, skip_special_tokens=True) in {p["prompt"] for p in PAIRS}
    batch = pair_collate(tokenizer.pad_token_id)([samples[0], samples[1]])
    assert batch["input_ids"].shape == (4, 24)
    assert batch["input_ids"][0].tolist() == pair["chosen_input_ids"]  # chosen rows first
    rejected = pair["rejected_input_ids"]
    assert batch["input_ids"][2, :len(rejected)].tolist() == rejected
    assert batch["labels"][2, len(rejected):].eq(-100).all()  # padding


def test_padding_of_pairs_counts_both_sides():
    """Each side of a pair is padded to the batch's longest sequence."""
    import datasets

    from llm_finetune.data.batching import GlobalBatchSampler
    from llm_finetune.data.loaders import padding_fraction
    from llm_finetune.data.pairs import pair_lengths, pair_tokens

    samples = datasets.Dataset.from_list([
        {"chosen_input_ids": [1] * 10, "rejected_input_ids": [1] * 5},
        {"chosen_input_ids": [1] * 4, "rejected_input_ids": [1] * 8}])
    sampler = GlobalBatchSampler(pair_lengths(samples), 2, 0, 1, shuffle=False, seed=0,
                                 group_by_length=True)
    assert sampler.lengths == [10, 8]
    padded = 4 * 10  # four sequences of the longest's 10 tokens
    assert padding_fraction(samples, sampler, build_run_config().train, pair_tokens(samples)) \
        == pytest.approx(1 - 27 / padded)


# 4. bad input, refused before the model loads

def file_run(tmp_path, path, **extra) -> dict:
    return {**FAST, **DPO, "output_dir": str(tmp_path / "out"), "file_dataset.data_files":
            str(path), "file_dataset.val_split": 0.25, **extra}


def test_rows_missing_rejected_are_named_by_file_and_line(tmp_path, capsys, no_model_load):
    rows = PAIRS[:7] + [{"prompt": "What is 1 + 1?", "chosen": "2"}] + PAIRS[7:]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    line = cli_error(capsys, **file_run(tmp_path, path))
    assert "prefs.jsonl line 8: missing field 'rejected'" in line and "--bad_rows skip" in line


@pytest.mark.parametrize("rows,expected", [
    ([{"prompt": "a", "chosen": "b"}] * 20,
     "--method dpo needs preference rows with columns prompt, chosen and rejected; no column "
     "'rejected'"),
    (PAIRS[:5] + [{"prompt": "What is " * 40, "chosen": "x", "rejected": "y"}] + PAIRS[5:],
     "prefs.jsonl line 6: the prompt fills --context_length 32: no token of the 'chosen' "
     "response is left. Raise --context_length"),
])
def test_bad_preference_files(rows, expected, tmp_path, capsys, no_model_load):
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    line = cli_error(capsys, **file_run(tmp_path, path, context_length=32))
    assert expected in line


@pytest.mark.parametrize("settings,expected", [
    ({"batching_strategy": "packing"}, "use --batching_strategy padding"),
    ({"enable_fsdp": True}, "add --use_peft (the reference is the model with its LoRA off)"),
    ({"use_peft": True, "peft_method": "llama_adapter"}, "use --peft_method lora"),
    ({"use_peft": True, "from_peft_checkpoint": "."}, "Merge the adapter first"),
    ({"dataset": "alpaca_dataset"}, "use --dataset file_dataset"),
    ({"dpo_beta": 0}, "--dpo_beta must be positive"),
    ({"dpo_loss": "kto"}, "is not one of: sigmoid, ipo, hinge"),
])
def test_settings_dpo_cannot_run_with(settings, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate(build_run_config(**{**DPO, **settings}), world_size=1, cuda=False)


def test_dpo_pads_where_supervised_runs_take_llama_recipes_packing():
    """A real model with no batching given: SFT packs (llama-recipes' default), DPO pads."""
    real = {"model_name": "llama3-8b"}
    assert build_run_config(**real).train.batching_strategy == "packing"
    run = build_run_config(**real, **DPO)
    assert run.train.batching_strategy == "padding"
    validate(run, world_size=1, cuda=False)


# 5. the memory plan

def test_the_plan_counts_both_sequences_of_a_pair_and_the_frozen_copy():
    settings = dict(model_name="llama3-8b", context_length=1024, batch_size_training=2)
    for peft in (True, False):
        sft = build_run_config(**settings, use_peft=peft)
        dpo = build_run_config(**settings, use_peft=peft, **DPO)
        counts = plan.count_parameters(sft)
        sft_plan, dpo_plan = plan.estimate(sft, 1, counts), plan.estimate(dpo, 1, counts)
        activations = [k for k in sft_plan.gpu if k.startswith("activations")]
        assert dpo_plan.gpu[activations[0]] == pytest.approx(2 * sft_plan.gpu[activations[0]])
        copy = "reference model (frozen copy, DPO)"
        assert (copy in dpo_plan.gpu) == (not peft) and copy not in sft_plan.gpu
        if not peft:
            assert dpo_plan.gpu[copy] == sft_plan.gpu["weights"]
        setting = plan.Setting(2, 0)
        assert plan.compute_per_token(dpo, setting, 32) == \
            plan.compute_per_token(sft, setting, 32) + 1
