"""Settings: flat and dotted keys, files, type checks, unknown keys, impossible combinations."""

import json
import subprocess
import sys

import pytest
import torch

from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.preflight import validate
from tests.helpers import REPO


def test_defaults_follow_llama_recipes_names():
    run = build_run_config()
    assert run.train.model_name == "tiny-llama"
    assert run.lora.r == 8 and run.lora.lora_alpha == 32 and run.lora.lora_dropout == 0.05
    assert run.lora.target_modules == ["q_proj", "v_proj"]
    assert run.fsdp.sharding_strategy == "FULL_SHARD"
    assert run.fsdp.checkpoint_type == "SHARDED_STATE_DICT"


def test_flat_and_dotted_keys():
    run = build_run_config(lr=2e-4, **{"fsdp_config.pure_bf16": True, "lora_config.r": 16,
                                       "lora_config.target_modules": "q_proj,k_proj,v_proj",
                                       "alpaca_dataset.data_path": "my.json"})
    assert run.train.lr == 2e-4
    assert run.fsdp.pure_bf16 is True
    assert run.lora.r == 16 and run.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert run.dataset.data_path == "my.json"


def test_flat_key_sets_every_config_that_has_it():
    # llama-recipes semantics: --use_fp16 reaches train_config and fsdp_config alike
    run = build_run_config(use_fp16=True, pure_bf16=True)
    assert run.train.use_fp16 and run.fsdp.use_fp16 and run.fsdp.pure_bf16


def test_command_line_strings_are_converted():
    run = build_run_config(lr="1e-4", num_epochs="3", enable_fsdp="true", output_dir=7)
    assert run.train.lr == 1e-4 and run.train.num_epochs == 3
    assert run.train.enable_fsdp is True and run.train.output_dir == "7"


@pytest.mark.parametrize("key,value,expected", [
    ("num_epochs", "three", "expects an integer"),
    ("lr", "fast", "expects a number"),
    ("enable_fsdp", "maybe", "expects true or false"),
    ("lora_config.r", 2.5, "expects an integer"),
])
def test_bad_types_name_the_setting(key, value, expected):
    with pytest.raises(ConfigError, match=expected):
        build_run_config(**{key: value})


def test_unknown_key_is_an_error_with_suggestions():
    with pytest.raises(ConfigError) as error:
        build_run_config(learning_rate=1e-4, **{"fsdp_config.pure_bf61": True})
    message = str(error.value)
    assert "--learning_rate" in message and "--fsdp_config.pure_bf61" in message
    assert "--fsdp_config.pure_bf16" in message
    # names from the transformers Trainer point to ours
    assert "unknown setting --learning_rate. Did you mean --lr" in message
    with pytest.raises(ConfigError, match="--per_device_train_batch_size. Did you mean "
                                          "--batch_size_training"):
        build_run_config(per_device_train_batch_size=2)


def test_unknown_choice_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="FULL_SHARD, SHARD_GRAD_OP"):
        build_run_config(**{"fsdp_config.sharding_strategy": "ZERO3"})


def test_hsdp_flag_selects_hybrid_shard():
    assert build_run_config(hsdp=True).fsdp.sharding_strategy == "HYBRID_SHARD"
    # llama-recipes' spelling: both flags
    both = build_run_config(hsdp=True, **{"fsdp_config.sharding_strategy": "HYBRID_SHARD"})
    assert both.fsdp.sharding_strategy == "HYBRID_SHARD"
    # llama-recipes would ignore hsdp here; a contradiction is refused, not half-obeyed
    with pytest.raises(ConfigError, match="asks for HYBRID_SHARD, but .* is FULL_SHARD: drop one"):
        build_run_config(hsdp=True, **{"fsdp_config.sharding_strategy": "FULL_SHARD"})


# every field of llama-recipes' configs/*.py (training, fsdp, peft, quantization, datasets,
# wandb), with a value of the type and spelling its users give: enums and torch dtypes as
# printed, None for empty strings and lists
LLAMA_RECIPES_SETTINGS = {
    "model_name": "meta-llama/Llama-3.1-8B", "tokenizer_name": None, "enable_fsdp": True,
    "low_cpu_fsdp": True, "run_validation": True, "batch_size_training": 4,
    "batching_strategy": "packing", "context_length": 4096, "gradient_accumulation_steps": 1,
    "gradient_clipping": False, "gradient_clipping_threshold": 1.0, "num_epochs": 3,
    "max_train_step": 0, "max_eval_step": 0, "num_workers_dataloader": 1, "lr": 1e-4,
    "weight_decay": 0.0, "gamma": 0.85, "seed": 42, "use_fp16": False, "mixed_precision": True,
    "val_batch_size": 1, "dataset": "samsum_dataset", "peft_method": "lora", "use_peft": True,
    "from_peft_checkpoint": "", "output_dir": "out", "freeze_layers": False,
    "num_freeze_layers": 1, "freeze_LLM_only": False, "quantization": None, "one_gpu": False,
    "save_model": True, "dist_checkpoint_root_folder": "ckpt", "dist_checkpoint_folder": "ft",
    "save_optimizer": False, "use_fast_kernels": False, "use_wandb": False,
    "save_metrics": False, "flop_counter": False, "flop_counter_start": 3,
    "use_profiler": False, "profiler_dir": "prof",
    "fsdp_config.mixed_precision": True, "fsdp_config.use_fp16": False,
    "fsdp_config.sharding_strategy": "ShardingStrategy.HYBRID_SHARD", "fsdp_config.hsdp": True,
    "fsdp_config.sharding_group_size": 0, "fsdp_config.replica_group_size": 0,
    "fsdp_config.checkpoint_type": "StateDictType.SHARDED_STATE_DICT",
    "fsdp_config.fsdp_activation_checkpointing": True, "fsdp_config.fsdp_cpu_offload": False,
    "fsdp_config.pure_bf16": False, "fsdp_config.optimizer": "AdamW",
    "lora_config.r": 8, "lora_config.lora_alpha": 32,
    "lora_config.target_modules": ["q_proj", "v_proj"], "lora_config.bias": "none",
    "lora_config.task_type": "CAUSAL_LM", "lora_config.lora_dropout": 0.05,
    "lora_config.inference_mode": False, "llama_adapter_config.adapter_len": 10,
    "llama_adapter_config.adapter_layers": 30, "llama_adapter_config.task_type": "CAUSAL_LM",
    "prefix_config.num_virtual_tokens": 30, "prefix_config.task_type": "CAUSAL_LM",
    "quantization_config.quant_type": "fp4", "quantization_config.compute_dtype": "torch.bfloat16",
    "quantization_config.use_double_quant": False,
    "quantization_config.quant_storage": "torch.bfloat16",
    "samsum_dataset.dataset": "samsum_dataset", "samsum_dataset.train_split": "train",
    "samsum_dataset.test_split": "validation", "grammar_dataset.dataset": "grammar_dataset",
    "grammar_dataset.train_split": "gtrain_10k.csv",
    "grammar_dataset.test_split": "grammar_validation.csv",
    "alpaca_dataset.dataset": "alpaca_dataset", "alpaca_dataset.train_split": "train",
    "alpaca_dataset.test_split": "val", "alpaca_dataset.data_path": "alpaca_data.json",
    "custom_dataset.dataset": "custom_dataset", "custom_dataset.file": "my_data.py",
    "custom_dataset.train_split": "train", "custom_dataset.test_split": "validation",
    "custom_dataset.data_path": "",
    "llamaguard_toxicchat_dataset.dataset": "llamaguard_toxicchat_dataset",
    "llamaguard_toxicchat_dataset.train_split": "train",
    "llamaguard_toxicchat_dataset.test_split": "test",
    "wandb_config.project": "llama_cookbook", "wandb_config.entity": None,
    "wandb_config.job_type": None, "wandb_config.tags": None, "wandb_config.group": None,
    "wandb_config.notes": None, "wandb_config.mode": None,
}


def test_every_llama_recipes_setting_is_accepted():
    run = build_run_config(**LLAMA_RECIPES_SETTINGS)
    assert run.fsdp.sharding_strategy == "HYBRID_SHARD"
    assert run.fsdp.checkpoint_type == "SHARDED_STATE_DICT"
    assert run.quantization.compute_dtype == "bfloat16" and run.train.quantization == ""
    assert run.train.tokenizer_name == "" and run.wandb.entity == ""


def test_llama_recipes_printed_enums_and_dtypes():
    from torch.distributed.fsdp import ShardingStrategy, StateDictType

    for value in ("StateDictType.FULL_STATE_DICT", StateDictType.FULL_STATE_DICT):
        run = build_run_config(**{"fsdp_config.checkpoint_type": value})
        assert run.fsdp.checkpoint_type == "FULL_STATE_DICT"
    run = build_run_config(**{"fsdp_config.checkpoint_type": "StateDictType.SHARDED_STATE_DICT",
                              "fsdp_config.sharding_strategy": ShardingStrategy.SHARD_GRAD_OP,
                              "quantization_config.compute_dtype": torch.float16})
    assert run.fsdp.checkpoint_type == "SHARDED_STATE_DICT"
    assert run.fsdp.sharding_strategy == "SHARD_GRAD_OP"
    assert run.quantization.compute_dtype == "float16"
    with pytest.raises(ConfigError, match="is not one of: SHARDED_STATE_DICT, FULL_STATE_DICT"):
        build_run_config(**{"fsdp_config.checkpoint_type": "StateDictType.LOCAL_STATE_DICT"})


def test_bare_quantization_means_8bit_as_in_llama_recipes(capsys):
    assert build_run_config(quantization=True).train.quantization == "8bit"  # fire's bare flag
    assert "a bare --quantization means 8-bit" in capsys.readouterr().err
    assert build_run_config(quantization=False).train.quantization == ""
    assert build_run_config(quantization="4bit").train.quantization == "4bit"


def test_freeze_llm_only_is_for_vision_models():
    assert build_run_config(freeze_LLM_only=False).train.freeze_LLM_only is False
    assert build_run_config(**{"train_config.freeze_LLM_only": "True"}).train.freeze_LLM_only
    with pytest.raises(ConfigError, match="vision model's language model.*--freeze_layers"):
        validate(build_run_config(freeze_LLM_only=True), 1, False)  # tiny-llama: a causal LM


def test_a_dataset_config_names_its_own_data_set():
    build_run_config(**{"samsum_dataset.dataset": "samsum_dataset"})
    with pytest.raises(ConfigError, match="chosen by --dataset grammar_dataset"):
        build_run_config(**{"samsum_dataset.dataset": "grammar_dataset"})


def test_custom_dataset_data_path_is_the_functions_to_read():
    run = build_run_config(dataset="custom_dataset", **{
        "custom_dataset.file": str(REPO / "examples/custom_dataset.py"),
        "custom_dataset.data_path": "some-org/some-data"})
    validate(run, world_size=1, cuda=False)  # not a local file: not checked
    assert run.dataset.data_path == "some-org/some-data"


def test_anyprecision_needs_bf16_weights():
    run = build_run_config(pure_bf16=True, **{"fsdp_config.optimizer": "anyprecision"})
    validate(run, world_size=1, cuda=False)
    with pytest.raises(ConfigError, match="add --fsdp_config.pure_bf16 True"):
        validate(build_run_config(**{"fsdp_config.optimizer": "anyprecision"}), 1, False)


def test_grammar_split_files_are_checked(tmp_path):
    run = build_run_config(dataset="grammar_dataset",
                           **{"grammar_dataset.train_split": str(tmp_path / "gtrain_10k.csv")})
    with pytest.raises(ConfigError, match="train_split: .*gtrain_10k.csv: no such file"):
        validate(run, world_size=1, cuda=False)


def test_config_file_then_flags_override(tmp_path):
    preset = tmp_path / "run.json"
    preset.write_text(json.dumps({"lr": 5e-4, "fsdp_config": {"pure_bf16": True},
                                  "lora_config": {"r": 4}}))
    run = build_run_config(config=str(preset), lr=1e-5)
    assert run.train.lr == 1e-5 and run.fsdp.pure_bf16 and run.lora.r == 4


def test_shipped_presets_parse():
    presets = sorted((REPO / "configs").glob("*.yaml"))
    assert len(presets) >= 3
    for preset in presets:
        run = build_run_config(config=str(preset))
        assert run.train.output_dir.startswith("output/")


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such file"):
        build_run_config(config="nope.yaml")


@pytest.mark.parametrize("kwargs,world,cuda,expected", [
    ({"use_fp16": True, "pure_bf16": True}, 1, True, "pick one"),
    ({}, 2, False, "without --enable_fsdp"),
    ({"low_cpu_fsdp": True}, 1, False, "needs --enable_fsdp"),
    ({"enable_fsdp": True, "hsdp": True, "fsdp_config.sharding_group_size": 4}, 2, False,
     "needs 4 ranks, but 2 were launched"),
    ({"use_fp16": True}, 1, False, "needs a CUDA GPU"),
    ({"fsdp_config.fsdp_cpu_offload": True, "enable_fsdp": True}, 1, False, "nothing to offload"),
    ({"quantization": "4bit"}, 1, True, "add --use_peft"),
    ({"quantization": "8bit", "use_peft": True, "enable_fsdp": True}, 2, True, "cannot be sharded"),
    ({"freeze_layers": True, "use_peft": True}, 1, False, "Drop one"),
    ({"one_gpu": True, "enable_fsdp": True}, 2, True, "single-process"),
    ({"from_peft_checkpoint": "/nowhere", "use_peft": True}, 1, False, "no such directory"),
    ({"from_peft_checkpoint": "/tmp"}, 1, False, "add --use_peft"),
    ({"use_peft": True, "peft_method": "prefix"}, 1, False, "fsdp_activation_checkpointing False"),
    ({"alpaca_dataset.data_path": "/no/data.json"}, 1, False, "no such file"),
    ({"batch_size_training": 0}, 1, False, "at least 1"),
    ({"enable_fsdp": True, "enable_ddp": True}, 2, True, "pick one"),
    ({"quantization": "8bit", "use_peft": True, "model_name": "llama3-8b"}, 1, True,
     "use --quantization 4bit"),
    ({"fsdp_config.no_checkpoint_layers": 2,
      "fsdp_config.fsdp_activation_checkpointing": False}, 1, False, "which is off"),
    ({"fsdp_config.no_checkpoint_layers": -1}, 1, False, "0 or more"),
])
def test_impossible_combinations_fail_before_loading(kwargs, world, cuda, expected):
    with pytest.raises(ConfigError, match=expected):
        validate(build_run_config(**kwargs), world_size=world, cuda=cuda)


def test_cli_reports_unknown_flag_and_exits_2():
    done = subprocess.run([sys.executable, "-m", "llm_finetune.finetuning", "--lerning_rate", "1"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    assert "unknown setting --lerning_rate" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_help_settings_lists_every_config():
    done = subprocess.run([sys.executable, "-m", "llm_finetune.finetuning", "--help_settings"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0
    for name in ("train_config:", "fsdp_config:", "lora_config:", "file_dataset:",
                 "--fsdp_config.pure_bf16=False", "--resume_from_checkpoint=''"):
        assert name in done.stdout
