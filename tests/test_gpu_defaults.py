"""Fast by default on a GPU (plan/gpu_defaults.py): the settings a user did not give take the
fast attention path and the planner's fastest micro-batch and checkpointing; given settings are
kept; CPU runs are untouched. The GPU side is planned here for a stated --gpu_memory, so these
run on CPU; the GPU matrix runs the defaults on a real GPU (docs/gpu_runs.md)."""

import dataclasses

import pytest

from llm_finetune import finetuning
from llm_finetune.config_utils import build_run_config
from llm_finetune.plan import apply_gpu_defaults, count_parameters, estimate

LORA_8B = dict(model_name="llama3-8b", use_peft=True, context_length=2048, gpu_memory="80GiB")


def settings(run):
    return (run.train.batch_size_training, run.train.gradient_accumulation_steps,
            run.fsdp.fsdp_activation_checkpointing, run.fsdp.no_checkpoint_layers,
            run.train.use_fast_kernels)


def test_a_cpu_run_keeps_llama_recipes_defaults():
    run = build_run_config(**LORA_8B)
    assert settings(apply_gpu_defaults(run, 1, cuda=False, verbose=True)) == (4, 1, True, 0, False)


def test_a_gpu_run_takes_fast_attention_and_the_fastest_setting_that_fits(capsys):
    run = build_run_config(**LORA_8B, max_train_step=40)
    fast = apply_gpu_defaults(run, 1, cuda=True, verbose=True)
    printed = capsys.readouterr().out
    assert "GPU defaults" in printed and "--use_fast_kernels True (flash-attention" in printed
    assert fast.train.use_fast_kernels
    micro, accumulation = fast.train.batch_size_training, fast.train.gradient_accumulation_steps
    assert micro * accumulation == 4  # the same sequences per optimizer step
    assert fast.train.max_train_step == 40 * accumulation  # the same optimizer steps
    # less recompute than llama-recipes' default, within 80% of the GPU
    assert not fast.fsdp.fsdp_activation_checkpointing or fast.fsdp.no_checkpoint_layers > 0
    assert estimate(fast, 1, count_parameters(fast)).gpu_peak <= 0.8 * 80 * 2**30
    assert "planned" in printed and "of 64.0 GiB" in printed


def test_a_tight_gpu_keeps_recompute_and_a_small_one_keeps_the_run(capsys):
    tight = apply_gpu_defaults(build_run_config(**{**LORA_8B, "gpu_memory": "24GiB"}), 1,
                               cuda=True, verbose=False)
    assert tight.fsdp.fsdp_activation_checkpointing  # no room to keep every layer's activations
    assert estimate(tight, 1, count_parameters(tight)).gpu_peak <= 0.8 * 24 * 2**30
    small = build_run_config(**{**LORA_8B, "gpu_memory": "8GiB"})
    kept = apply_gpu_defaults(small, 1, cuda=True, verbose=True)
    assert settings(kept)[:4] == (4, 1, True, 0)  # nothing fits: the run's own, not an error
    assert "finds none that fits" in capsys.readouterr().out


@pytest.mark.parametrize("pin", [{"batch_size_training": 4},
                                 {"fsdp_config.fsdp_activation_checkpointing": True},
                                 {"gradient_accumulation_steps": 1},
                                 {"fsdp_config.no_checkpoint_layers": 0}])
def test_a_given_micro_batch_or_checkpointing_setting_pins_them_all(pin):
    run = apply_gpu_defaults(build_run_config(**LORA_8B, **pin), 1, cuda=True, verbose=False)
    assert settings(run) == (4, 1, True, 0, True)


def test_use_fast_kernels_false_keeps_sdpa():
    run = build_run_config(**LORA_8B, use_fast_kernels=False)
    assert not apply_gpu_defaults(run, 1, cuda=True, verbose=False).train.use_fast_kernels


def test_under_fsdp_the_micro_batch_stays_and_only_checkpointing_moves():
    run = build_run_config(**{**LORA_8B, "enable_fsdp": True})
    fast = apply_gpu_defaults(run, 4, cuda=True, verbose=False)
    assert (fast.train.batch_size_training, fast.train.gradient_accumulation_steps) == (4, 1)
    assert not fast.fsdp.fsdp_activation_checkpointing or fast.fsdp.no_checkpoint_layers > 0


def test_the_run_configures_with_the_defaults_on_a_gpu(capsys):
    run = finetuning.configure(dict(LORA_8B), world_size=1, cuda=True, verbose=True)
    assert run.train.use_fast_kernels and "GPU defaults" in capsys.readouterr().out
    explicit = finetuning.configure({**LORA_8B, "auto_fit": False}, world_size=1, cuda=True,
                                    verbose=False)
    assert settings(explicit)[:4] == (4, 1, True, 0)  # --auto_fit False pins the setting
    assert dataclasses.asdict(finetuning.configure(dict(LORA_8B), 1, cuda=False,
                                                   verbose=False).train)["use_fast_kernels"] is False


def test_the_recipe_of_a_built_in_model_pins_like_a_flag():
    """tiny-llama's recipe sets its micro-batch: a GPU run keeps it (the attention still
    defaults)."""
    run = apply_gpu_defaults(build_run_config(gpu_memory="80GiB"), 1, cuda=True, verbose=False)
    assert settings(run) == (8, 1, True, 0, True)


def test_a_dry_run_for_a_stated_gpu_plans_the_defaulted_run(capsys):
    """--dry_run --gpu_memory on a machine without one plans what that GPU would run."""
    text = finetuning.main(**LORA_8B, dry_run=True)["plan"]
    assert "GPU defaults" in capsys.readouterr().out
    assert "batch 4 x 2048 tokens per GPU" in text or "batch 1 x 2048 tokens per GPU" in text
    assert "fastest within the same memory" not in text  # already applied


def test_vision_models_keep_their_attention_and_take_the_planned_setting(capsys):
    """mllama has no flash-attention 2 (and vision batches are padded): SDPA stays. The planned
    setting applies: Llama-3.2-11B-Vision LoRA on an H200 measured within 5% of its plan and
    1.66x faster without recompute (docs/vision.md)."""
    run = build_run_config(model_name="llama3.2-11b-vision", use_peft=True,
                           batching_strategy="padding", context_length=2048,
                           gpu_memory="139GiB")
    fast = apply_gpu_defaults(run, 1, cuda=True, verbose=True)
    assert "--use_fast_kernels" not in capsys.readouterr().out
    assert not fast.train.use_fast_kernels
    assert fast.train.batch_size_training * fast.train.gradient_accumulation_steps == 4
    assert not fast.fsdp.fsdp_activation_checkpointing or fast.fsdp.no_checkpoint_layers > 0
    assert estimate(fast, 1, count_parameters(fast)).gpu_peak <= 0.8 * 139 * 2**30
