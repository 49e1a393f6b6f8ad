"""Settings: flat and dotted keys, files, type checks, unknown keys, impossible combinations."""

import json
import subprocess
import sys

import pytest

from llm_finetune.config_utils import ConfigError, build_run_config, validate
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
                                       "alpaca_dataset.eval_size": 50})
    assert run.train.lr == 2e-4
    assert run.fsdp.pure_bf16 is True
    assert run.lora.r == 16 and run.lora.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert run.dataset.eval_size == 50


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
