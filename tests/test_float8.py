"""--float8 (llm_finetune/float8.py): what it refuses before anything loads, and on CPU (where
PyTorch emulates float8 matmuls) that it trains and saves a plain checkpoint. Its speed and its
loss against bf16 on a GPU: tests/test_gpu.py and docs/performance.md."""

import pytest
import torch

from llm_finetune import finetuning, float8
from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.float8 import check_float8_settings
from tests.helpers import FAST


@pytest.mark.parametrize("settings, cuda, capability, match", [
    ({"use_peft": True}, False, None, "frozen base"),
    ({"quantization": "4bit"}, False, None, "--quantization 4bit"),
    ({"freeze_LLM_only": True}, False, None, "--freeze_LLM_only"),
    ({"use_fp16": True}, True, (9, 0), "drop --use_fp16"),
    ({"fsdp_config.use_fp16": True, "enable_fsdp": True}, True, (9, 0),
     "drop --fsdp_config.use_fp16"),
    ({"torch_compile": True}, True, (8, 0), "compute capability 8.9 or newer"),
    ({}, True, (9, 0), "add --torch_compile True"),
])
def test_float8_refuses_what_it_cannot_speed_up(settings, cuda, capability, match, monkeypatch):
    monkeypatch.setattr(float8, "torchao_installed", lambda: True)
    with pytest.raises(ConfigError, match=match):
        check_float8_settings(build_run_config(float8=True, **settings), cuda, capability)
    check_float8_settings(build_run_config(**settings), cuda, capability)  # without: fine


def test_float8_is_checked_without_a_gpu_to_ask(monkeypatch):
    """On CPU float8 runs eagerly (to test it); the planner checks a GPU run from a machine
    without one, where no compute capability can be read."""
    monkeypatch.setattr(float8, "torchao_installed", lambda: True)
    check_float8_settings(build_run_config(float8=True), cuda=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_float8_settings(build_run_config(float8=True, torch_compile=True), cuda=True)


def test_float8_without_torchao_names_the_package(monkeypatch):
    monkeypatch.setattr(float8, "torchao_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"pip install 'llm_finetune\[float8\]'"):
        check_float8_settings(build_run_config(float8=True, torch_compile=True), True, (9, 0))


def test_float8_converts_the_layers_of_the_model_that_trains(tiny_model_dir, tmp_path,
                                                             monkeypatch):
    """--float8 reaches the model: the text decoder layers are converted before training
    (recorded here, so that CI, without torchao, checks the flag is not ignored)."""
    converted = []
    monkeypatch.setattr(float8, "torchao_installed", lambda: True)
    monkeypatch.setattr(finetuning, "convert_to_float8",
                        lambda layers: converted.append(len(layers)) or 0)
    finetuning.main(**{**FAST, "max_train_step": 1}, model_name=str(tiny_model_dir),
                    output_dir=str(tmp_path), float8=True)
    assert converted == [4]  # the tiny model's 4 decoder layers, once


def test_float8_trains_and_saves_a_plain_checkpoint(tiny_model_dir, tmp_path):
    """Every linear of the decoder layers computes in float8; the loss stays within float8's
    rounding of the run without it and falls; the saved model has the original's names and
    loads with plain transformers, holding the trained weights."""
    pytest.importorskip("torchao")
    from torchao.float8.float8_linear import Float8Linear
    from transformers import AutoModelForCausalLM

    run = dict(FAST, model_name=str(tiny_model_dir))
    plain = finetuning.main(**run, output_dir=str(tmp_path / "a"))
    summary = finetuning.main(**{**run, "save_model": True}, float8=True,
                              output_dir=str(tmp_path / "b"))
    trained = summary["model"]
    assert sum(isinstance(m, Float8Linear) for m in trained.modules()) == 4 * 7
    losses = [m["loss"] for m in summary["metrics"] if "loss" in m]
    expected = [m["loss"] for m in plain["metrics"] if "loss" in m]
    assert losses == pytest.approx(expected, rel=0.02) and losses[-1] < losses[0]
    saved = AutoModelForCausalLM.from_pretrained(summary["saved_to"]).state_dict()
    assert set(saved) == set(AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict())
    for name, tensor in trained.state_dict().items():  # the trained weights, as trained
        torch.testing.assert_close(saved[name], tensor, rtol=0, atol=0)
