"""llama-recipes fidelity: its defaults (a table of its values, from llama-cookbook's
src/llama_cookbook/configs/*.py), the tiny model's own recipe, max_train_step in micro-batches,
the model saved after each epoch with the best eval loss, the adapter in output_dir."""

import json
import re

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llm_finetune import finetuning
from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.preflight import validate
from llm_finetune.configs import (fsdp_config, llama_adapter_config, lora_config, prefix_config,
                                  quantization_config, samsum_dataset, train_config,
                                  wandb_config)
from llm_finetune.configs.datasets import alpaca_dataset
from llm_finetune.configs.recipes import RECIPES
from llm_finetune.data.rows import DataError
from tests.helpers import FAST, REPO, probe_input

# llama-cookbook's defaults, copied from its configs (None written as their None)
THEIRS = {
    train_config: dict(
        model_name="PATH/to/Model", tokenizer_name=None, enable_fsdp=False, low_cpu_fsdp=False,
        run_validation=True, batch_size_training=4, batching_strategy="packing",
        context_length=4096, gradient_accumulation_steps=1, gradient_clipping=False,
        gradient_clipping_threshold=1.0, num_epochs=3, max_train_step=0, max_eval_step=0,
        num_workers_dataloader=1, lr=1e-4, weight_decay=0.0, gamma=0.85, seed=42,
        use_fp16=False, mixed_precision=True, val_batch_size=1, dataset="samsum_dataset",
        peft_method="lora", use_peft=False, from_peft_checkpoint="",
        output_dir="PATH/to/save/PEFT/model", freeze_layers=False, num_freeze_layers=1,
        freeze_LLM_only=False, quantization=None, one_gpu=False, save_model=True,
        dist_checkpoint_root_folder="PATH/to/save/FSDP/model",
        dist_checkpoint_folder="fine-tuned", save_optimizer=False, use_fast_kernels=False,
        use_wandb=False, save_metrics=False, flop_counter=False, flop_counter_start=3,
        use_profiler=False, profiler_dir="PATH/to/save/profiler/results"),
    fsdp_config: dict(
        mixed_precision=True, use_fp16=False, sharding_strategy="FULL_SHARD", hsdp=False,
        sharding_group_size=0, replica_group_size=0, checkpoint_type="SHARDED_STATE_DICT",
        fsdp_activation_checkpointing=True, fsdp_cpu_offload=False, pure_bf16=False,
        optimizer="AdamW"),
    lora_config: dict(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], bias="none",
                      task_type="CAUSAL_LM", lora_dropout=0.05, inference_mode=False),
    llama_adapter_config: dict(adapter_len=10, adapter_layers=30, task_type="CAUSAL_LM"),
    prefix_config: dict(num_virtual_tokens=30, task_type="CAUSAL_LM"),
    quantization_config: dict(quant_type="fp4", compute_dtype="bfloat16",
                              use_double_quant=False, quant_storage="bfloat16"),
    wandb_config: dict(project="llama_cookbook", entity=None, job_type=None, tags=None,
                       group=None, notes=None, mode=None),
    # (their `dataset` field, which names the config itself, is read as a key, not a field:
    # tests/test_config.py::test_a_dataset_config_names_its_own_data_set)
    alpaca_dataset: dict(train_split="train", test_split="val",
                         data_path="src/llama_cookbook/datasets/alpaca_data.json"),
    samsum_dataset: dict(train_split="train", test_split="validation"),
}
# where ours is kept different, each with its reason in docs/llama_recipes.md: placeholders
# that cannot run (paths), and what was measured better or cheaper
KEPT = {
    (train_config, "model_name"): "tiny-llama",
    (train_config, "output_dir"): "output",
    (train_config, "dist_checkpoint_root_folder"): "",
    (train_config, "profiler_dir"): "",
    (train_config, "save_metrics"): True,
    (quantization_config, "quant_type"): "nf4",
    (quantization_config, "quant_storage"): "",
}
NOT_SUPPORTED = set()  # every train_config field of theirs has one here
COMPATIBILITY = (REPO / "docs" / "llama_recipes.md").read_text()


def theirs_in_our_spelling(value):
    """Their None for "not set" is our empty string (a string field), or None (a list)."""
    return "" if value is None else value


@pytest.mark.parametrize("config", list(THEIRS), ids=lambda c: c.__name__)
def test_defaults_are_llama_recipes(config):
    ours = vars(config())
    for field, value in THEIRS[config].items():
        if (config, field) in NOT_SUPPORTED:
            assert field not in ours
        elif (config, field) in KEPT:
            assert ours[field] == KEPT[config, field], field
        elif value is None and ours[field] is None:
            continue
        else:
            assert ours[field] == theirs_in_our_spelling(value), field


@pytest.mark.parametrize("config", [train_config, fsdp_config, quantization_config,
                                    wandb_config], ids=lambda c: c.__name__)
def test_every_llama_recipes_field_has_a_row_in_the_compatibility_table(config):
    section = COMPATIBILITY.split(f"## {config.__name__}")[1].split("\n## ")[0]
    missing = [f for f in THEIRS[config] if not re.search(rf"`{f}`", section)]
    assert not missing, f"docs/llama_recipes.md, {config.__name__}: no row for {missing}"


# --- the tiny model's recipe ---------------------------------------------------------------

def test_the_tiny_recipe_is_for_the_built_in_model_only():
    tiny = build_run_config()
    assert tiny.train.model_name == "tiny-llama" and tiny.recipe == RECIPES["tiny-llama"]
    assert (tiny.train.dataset, tiny.train.batching_strategy, tiny.train.context_length,
            tiny.train.lr) == ("alpaca_dataset", "padding", 512, 1e-3)
    assert tiny.dataset.data_path.endswith("tiny_alpaca.json")
    for name in ("meta-llama/Llama-3.1-8B", "some/local/dir", "llama3-8b"):
        real = build_run_config(model_name=name)
        assert real.recipe == {}
        assert (real.train.dataset, real.train.batching_strategy, real.train.context_length,
                real.train.lr, real.train.num_epochs) == ("samsum_dataset", "packing", 4096,
                                                          1e-4, 3)


def test_the_tiny_recipe_fills_only_the_settings_not_given(tmp_path):
    run = build_run_config(lr=5e-4, **{"train_config.num_epochs": 1,
                                       "alpaca_dataset.data_path": "mine.json"})
    assert (run.train.lr, run.train.num_epochs, run.dataset.data_path) == (5e-4, 1, "mine.json")
    assert run.train.context_length == 512 and "lr" not in run.recipe
    preset = tmp_path / "run.yaml"
    preset.write_text("batching_strategy: packing\ntrain_config:\n  context_length: 128\n")
    run = build_run_config(config=str(preset), dataset="samsum_dataset")
    assert (run.train.batching_strategy, run.train.context_length, run.train.dataset) == \
        ("packing", 128, "samsum_dataset")
    assert run.train.lr == 1e-3 and set(run.recipe) == set(RECIPES["tiny-llama"]) - {
        "batching_strategy", "context_length", "dataset"}


def test_the_run_says_which_settings_came_from_the_recipe(capsys, tmp_path):
    finetuning.main(dry_run=True, gpu_memory="16GiB", num_epochs=1, output_dir=str(tmp_path))
    line = next(l for l in capsys.readouterr().out.splitlines() if "recipe" in l)
    assert line.startswith("tiny-llama's own recipe for the settings not given: dataset=")
    assert "num_epochs" not in line and "lr=0.001" in line


def test_a_real_model_without_a_dataset_never_trains_on_the_shipped_set(
        tiny_model_dir, tmp_path, monkeypatch):
    """llama-recipes' default data set, samsum, from the hub (offline here: the one-line data
    error), before any model loads."""
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(finetuning, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(DataError, match="samsum_dataset"):
        finetuning.main(model_name=str(tiny_model_dir), output_dir=str(tmp_path))


# --- max_train_step counts micro-batches ---------------------------------------------------

def test_max_train_step_counts_micro_batches_as_llama_recipes(tiny_model_dir, tmp_path, capsys):
    summary = finetuning.main(**{**FAST, "max_train_step": 5, "gradient_accumulation_steps": 2,
                                 "run_validation": False}, model_name=str(tiny_model_dir),
                              output_dir=str(tmp_path))
    assert summary["steps"] == 2  # 5 micro-batches: 2 optimizer steps of 2, one left over
    assert "--max_train_step 5 micro-batches with --gradient_accumulation_steps 2: 2 optimizer " \
           "steps (micro-batches left over, not run: 1)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="fewer than one optimizer step"):
        validate(build_run_config(max_train_step=1, gradient_accumulation_steps=2), 1, False)


# --- the model saved when llama-recipes saves it, where it puts it --------------------------

def logits_of(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe_input()).logits


@pytest.fixture(scope="module")
def rising_run(tiny_model_dir, tmp_path_factory):
    """LoRA for 3 epochs with a learning rate that StepLR multiplies by 100 each epoch: the eval
    loss falls, then rises in the last epoch. Also the same run stopped after 2 epochs (the
    best epoch's weights, in memory), and the 3-epoch run resumed from its epoch-2 checkpoint."""
    out = tmp_path_factory.mktemp("rising")
    rows = out / "rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "",
                                        "output": f"{2 * i + 1}"}) + "\n" for i in range(40)))
    settings = dict(FAST, model_name=str(tiny_model_dir), use_peft=True, dataset="file_dataset",
                    max_train_step=0, max_eval_step=0, lr=1e-3, gamma=100.0, save_model=True,
                    **{"file_dataset.data_files": str(rows), "file_dataset.val_split": 0.2})
    def run(name, **extra):
        return finetuning.main(**{**settings, "num_epochs": 3, **extra}, output_dir=str(out / name))

    three = run("three", save_each_epoch=True)
    two = run("two", num_epochs=2, save_model=False)
    epoch_2 = sorted((out / "three" / "checkpoints").iterdir())[1]
    resumed = run("resumed", resume_from_checkpoint=str(epoch_2))
    return dict(out=out, three=three, two=two, resumed=resumed)


def test_the_best_epochs_model_remains_when_the_last_epoch_is_worse(rising_run, tiny_model_dir):
    three, out = rising_run["three"], rising_run["out"] / "three"
    first, second, third = three["eval_loss"]
    assert second < first and third > second, three["eval_loss"]
    assert three["best_epoch"] == 2 and three["saved_to"] == str(out)
    # plain peft, from output_dir itself: the epoch-2 weights, not the last epoch's
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    torch.testing.assert_close(logits_of(loaded), logits_of(rising_run["two"]["model"]))
    assert not torch.allclose(logits_of(loaded), logits_of(three["model"]), atol=1e-3)


def test_a_resumed_run_replaces_the_best_model_only_with_a_better_one(rising_run):
    """Resumed after epoch 2, the run knows epoch 2's eval loss (its checkpoint records it):
    the worse epoch 3 is not saved."""
    resumed = rising_run["resumed"]
    assert resumed["eval_loss"] == rising_run["three"]["eval_loss"][2:]
    assert "saved_to" not in resumed
    assert not (rising_run["out"] / "resumed" / "adapter_model.safetensors").exists()


def test_the_adapter_lands_in_output_dir_with_llama_recipes_train_params(rising_run,
                                                                         tiny_model_dir):
    out = rising_run["out"] / "three"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "tokenizer_config.json").is_file() and not (out / "model").exists()
    assert not (out / "README.md").exists()  # peft's generic model card is not written
    assert not list(out.glob("*.tmp")), "a temporary directory was left behind"
    params = yaml.safe_load((out / "train_params.yaml").read_text())
    assert params["model_name"] == str(tiny_model_dir) and params["use_peft"] == "True"
    assert params["sharding_strategy"] == "FULL_SHARD"  # fsdp_config in the same mapping


def test_save_best_false_saves_the_final_model(tiny_model_dir, tmp_path):
    summary = finetuning.main(**{**FAST, "save_model": True}, save_best=False,
                              model_name=str(tiny_model_dir), output_dir=str(tmp_path))
    assert "best_epoch" not in summary
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(logits_of(loaded), logits_of(summary["model"]))
    assert yaml.safe_load((tmp_path / "model" / "train_params.yaml").read_text())[
        "save_best"] == "False"


def test_overwriting_a_peft_run_removes_its_adapter(tiny_model_dir, tmp_path):
    finetuning.main(**{**FAST, "save_model": True, "max_train_step": 1}, use_peft=True,
                    model_name=str(tiny_model_dir), output_dir=str(tmp_path))
    assert (tmp_path / "adapter_config.json").is_file()
    with pytest.raises(ConfigError, match="holds a previous run .*adapter_config.json"):
        finetuning.main(**{**FAST, "max_train_step": 1}, model_name=str(tiny_model_dir),
                        output_dir=str(tmp_path))
    finetuning.main(**{**FAST, "max_train_step": 1}, model_name=str(tiny_model_dir),
                    output_dir=str(tmp_path), overwrite_output_dir=True)
    assert not any((tmp_path / name).exists() for name in (
        "adapter_config.json", "adapter_model.safetensors", "train_params.yaml",
        "tokenizer.json", "tokenizer_config.json"))
