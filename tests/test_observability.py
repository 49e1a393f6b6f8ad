"""Trackers (TensorBoard, Weights & Biases), plots, and what the run reports about itself."""

import importlib.machinery
import json
import importlib.util
import sys
import types

import pytest
from transformers import AutoTokenizer

from llm_finetune import finetuning
from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.data.alpaca import format_prompt
from llm_finetune.metrics import read_records
from llm_finetune.model import BUILTIN_MODELS
from llm_finetune.preflight import validate
from tests.helpers import FAST


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records what the run sends."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.init_kwargs, self.logged, self.finished = None, [], False
        self.id = "fake-run-id"  # the run's id, as wandb.init's run has

    def init(self, **kwargs):
        self.init_kwargs = kwargs
        return self

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_tensorboard_and_wandb_get_every_record(tiny_model_dir, tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    summary = finetuning.main(**FAST, model_name=str(tiny_model_dir), output_dir=str(tmp_path),
                              use_tensorboard=True, use_wandb=True,
                              **{"wandb_config.project": "demo", "wandb_config.mode": "offline",
                                 "wandb_config.tags": "a,b"})
    losses = [m["loss"] for m in summary["metrics"] if "loss" in m]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert events.Scalars("eval/eval_loss")[0].value == pytest.approx(summary["eval_loss"][0])

    assert wandb.init_kwargs["project"] == "demo" and wandb.init_kwargs["mode"] == "offline"
    assert wandb.init_kwargs["tags"] == ["a", "b"]
    assert wandb.init_kwargs["config"]["train_config"]["lr"] == FAST["lr"]
    train = [(step, v["train/loss"]) for step, v in wandb.logged if "train/loss" in v]
    assert train == [(i + 1, pytest.approx(loss)) for i, loss in enumerate(losses)]
    assert any("eval/eval_perplexity" in v for _, v in wandb.logged) and wandb.finished


def test_a_missing_tracker_package_is_named_before_loading(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="--use_wandb needs the wandb package.*pip install wandb"):
        finetuning.main(use_wandb=True, output_dir=str(tmp_path))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_run_plots_its_metrics_and_runs_compare_on_one_plot(tiny_model_dir, tmp_path):
    from llm_finetune.plot import plot

    runs = []
    for lr in (1e-3, 3e-3):
        out = tmp_path / f"lr{lr}"
        summary = finetuning.main(**{**FAST, "plot_metrics": True, "lr": lr},
                                  model_name=str(tiny_model_dir), output_dir=str(out))
        assert sorted(p.rsplit("/", 1)[1] for p in summary["plots"]) == \
            ["loss.png", "lr.png", "tokens_per_s.png"]
        runs.append(str(out))
    written = plot(*runs, out=str(tmp_path / "both"))
    for path in written:
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "both" / "loss.png").stat().st_size > 10_000  # two curves and evals drawn


def test_summary_reports_memory_and_mfu(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    from llm_finetune.metrics import flops_per_token, model_flops_utilization

    summary = finetuning.main(**FAST, model_name=str(tiny_model_dir), output_dir=str(tmp_path))
    assert "plots" not in summary and not (tmp_path / "plots").exists()  # --plot_metrics False
    assert summary["peak_cpu_rss_gib"] > 0.1
    assert summary["mfu"] is None and summary["mfu_of_measured_peak"] is None  # on a CPU
    assert set(summary["phase_s"]) == {"load", "to_device", "data", "train"}
    # padded batches: the length a token attends over, at most the longest sample allowed
    assert 4 < summary["attention_length"] <= FAST.get("context_length", 512)
    # torchtitan's count for Llama-3-8B at 8192 tokens: 6 x N + 12 x layers x hidden x length
    full = flops_per_token(8.03e9, 8.03e9, 32, 4096, 8192)
    assert full == pytest.approx(6 * 8.03e9 + 12 * 32 * 4096 * 8192)
    lora = flops_per_token(8.03e9, 0, 32, 4096, 2048)  # a frozen base: no weight gradients
    assert lora == pytest.approx(4 * 8.03e9 + 12 * 32 * 4096 * 2048)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    # 2 GPUs at the datasheet's 989 TFLOP/s each, and at the measured 790
    assert model_flops_utilization(1e4, full, 2) == pytest.approx(
        {"mfu": 1e4 * full / 1.978e15, "mfu_of_measured_peak": 1e4 * full / 1.58e15})
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some GPU")
    assert model_flops_utilization(1e4, full, 1) == {"mfu": None, "mfu_of_measured_peak": None}


def test_moving_average_smooths_the_per_step_curve():
    from llm_finetune.plot import moving_average

    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([5.0, 1.0], 1) == [5.0, 1.0]


def test_time_waiting_for_data_is_measured_counted_and_warned_about(tiny_model_dir, tmp_path,
                                                                     monkeypatch, capsys):
    """A loader that takes 0.3 s per optimizer step: each step records the wait, its tokens/s
    counts it (the GPU stands idle meanwhile; this CPU trains the tiny model at about 12,000
    tokens/s), and the run says to add loader workers."""
    import time

    from llm_finetune import train

    batches = train.grouped

    def slow(loader, size):
        for group in batches(loader, size):
            time.sleep(0.3)
            yield group

    monkeypatch.setattr(train, "grouped", slow)
    summary = finetuning.main(**FAST, model_name=str(tiny_model_dir), output_dir=str(tmp_path))
    steps = [m for m in summary["metrics"] if "data_wait_s" in m]
    assert len(steps) == 4 and all(m["data_wait_s"] >= 0.3 for m in steps)
    assert summary["data_wait_s"] >= 1.2
    most_tokens_per_step = 4 * 512  # FAST's 4 rows of at most the default 512 tokens
    assert all(m["tokens_per_s"] <= most_tokens_per_step / 0.3 for m in steps)
    assert "of the training time went to waiting for batches" in capsys.readouterr().out


def test_eval_prompts_are_answered_at_each_evaluation_as_generate_would(tmp_path):
    """--eval_prompts: at each evaluation a record with the model's greedy answers; the last
    one is what transformers' own greedy generate gives for the trained model."""
    prompts = [format_prompt("What is 2 + 3?", ""), format_prompt("Name a colour.", "")]
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(prompts))
    summary = finetuning.main(**{**FAST, "num_epochs": 2, "max_train_step": 0,
                                 "max_eval_step": 1, "eval_prompts": str(path),
                                 "eval_max_new_tokens": 8, "output_dir": str(tmp_path / "out")})
    records = [r for r in read_records(tmp_path / "out" / "metrics.jsonl") if "samples" in r]
    assert [r["step"] for r in records] == [e["step"] for e in summary["metrics"]
                                            if "eval_loss" in e]
    assert [s["prompt"] for s in records[-1]["samples"]] == prompts
    model = summary["model"].eval()
    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    for sample in records[-1]["samples"]:
        ids = tokenizer(sample["prompt"], return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
        assert sample["answer"] == tokenizer.decode(out[0, ids.shape[1]:],
                                                    skip_special_tokens=True)


def test_eval_prompts_need_their_file_and_validation(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        validate(build_run_config(eval_prompts=str(tmp_path / "missing.json")), 1, False)
    (tmp_path / "p.txt").write_text("Hi\n")
    with pytest.raises(ConfigError, match="--run_validation is off"):
        validate(build_run_config(eval_prompts=str(tmp_path / "p.txt"), run_validation=False),
                 1, False)
