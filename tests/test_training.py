"""Single-process training: the default run learns, every PEFT method saves adapters that plain
peft loads, a full fine-tune saves a model that plain transformers loads, and gradient
accumulation and packing change nothing but speed."""

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llm_finetune import convert, finetuning
from llm_finetune.data.batching import pack_samples, packed_collate, pad_collate
from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.loss import output_layer, token_loss_sum
from llm_finetune.preflight import validate
from llm_finetune.train import Trainer
from tests.helpers import FAST, probe_input


def logits_of(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=probe_input()).logits


def test_default_run_learns_and_writes_metrics(tmp_path):
    # the embedded default (tiny model, shipped data), shortened to one epoch of 150 steps
    summary = finetuning.main(output_dir=str(tmp_path), num_epochs=1, max_train_step=150,
                              num_workers_dataloader=0)
    first_loss = summary["metrics"][0]["loss"]
    assert first_loss > 6.0  # ln(1024) = 6.93: an untrained model
    assert summary["eval_loss"][-1] < 0.5 * first_loss
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "eval_loss" in r]
    assert len(steps) == 150 and len(evals) == 1
    assert set(steps[0]) == {"step", "epoch", "loss", "lr", "tokens_per_s", "data_wait_s",
                            "peak_gpu_mem_gib"}
    assert set(evals[0]) == {"step", "eval_loss", "eval_perplexity"}
    assert evals[0]["eval_perplexity"] == pytest.approx(2.718281828 ** evals[0]["eval_loss"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(logits_of(model), logits_of(summary["model"]))


@pytest.mark.parametrize("method,extra", [
    ("lora", {}),
    ("llama_adapter", {"lr": 5e-2}),
    ("prefix", {"lr": 1e-1, "fsdp_config.fsdp_activation_checkpointing": False}),
])
def test_peft_method_trains_and_adapter_loads_with_plain_peft(method, extra, tiny_model_dir,
                                                              tmp_path):
    summary = finetuning.main(**{**FAST, **extra, "save_model": True, "max_train_step": 6},
                              model_name=str(tiny_model_dir), use_peft=True, peft_method=method,
                              output_dir=str(tmp_path))
    untrained = finetuning.main(**{**FAST, **extra, "lr": 1e-12, "max_train_step": 6},
                                model_name=str(tiny_model_dir), use_peft=True,
                                peft_method=method, output_dir=str(tmp_path / "untrained"))
    # same fixed eval batches before and after: a noise-free check that training helped
    assert summary["eval_loss"][-1] < untrained["eval_loss"][-1]
    trained = summary["model"]
    frozen_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.allclose(logits_of(trained), logits_of(frozen_base)), "adapter learned nothing"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       tmp_path)  # in output_dir itself, as llama-recipes saves it
    torch.testing.assert_close(logits_of(loaded), logits_of(trained), rtol=1e-5, atol=1e-5)


def test_from_peft_checkpoint_continues_the_adapter(tiny_model_dir, tmp_path):
    first = finetuning.main(**{**FAST, "save_model": True}, model_name=str(tiny_model_dir),
                            use_peft=True, output_dir=str(tmp_path / "a"))
    resumed = finetuning.main(model_name=str(tiny_model_dir), use_peft=True,
                              from_peft_checkpoint=str(tmp_path / "a"),
                              output_dir=str(tmp_path / "b"), **{**FAST, "lr": 1e-12})
    torch.testing.assert_close(logits_of(resumed["model"]), logits_of(first["model"]),
                               rtol=1e-5, atol=1e-5)


def test_freeze_layers_keeps_first_layers_fixed(tiny_model_dir, tmp_path):
    summary = finetuning.main(**FAST, model_name=str(tiny_model_dir), freeze_layers=True,
                              num_freeze_layers=2, output_dir=str(tmp_path))
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    after = summary["model"].state_dict()
    assert torch.equal(after["model.layers.1.mlp.up_proj.weight"],
                       before["model.layers.1.mlp.up_proj.weight"])
    assert not torch.equal(after["model.layers.2.mlp.up_proj.weight"],
                           before["model.layers.2.mlp.up_proj.weight"])


def test_gradient_accumulation_equals_the_large_batch(tiny_model_dir, tmp_path):
    large = finetuning.main(**{**FAST, "batch_size_training": 8}, model_name=str(tiny_model_dir),
                            output_dir=str(tmp_path / "a"))
    # max_train_step counts micro-batches, as llama-recipes does: 8 of them make 4 steps of 2
    accumulated = finetuning.main(**{**FAST, "batch_size_training": 4,
                                     "gradient_accumulation_steps": 2, "max_train_step": 8},
                                  model_name=str(tiny_model_dir), output_dir=str(tmp_path / "b"))
    assert [m["loss"] for m in accumulated["metrics"] if "loss" in m] == pytest.approx(
        [m["loss"] for m in large["metrics"] if "loss" in m], rel=1e-5)


def test_packed_batch_has_no_cross_talk(tiny_model_dir):
    """A packed block gives each sample the same token losses as running it alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    gen = torch.Generator().manual_seed(0)
    samples = []
    for n in (9, 14, 6):
        ids = torch.randint(3, 1000, (n,), generator=gen).tolist()
        samples.append({"input_ids": ids, "labels": [-100] + ids[1:]})
    blocks = pack_samples(samples, context_length=40, pad_token_id=2)
    assert len(blocks) == 1
    head = output_layer(model)  # the chunked loss, the default
    with torch.no_grad():
        packed, packed_tokens = token_loss_sum(model, packed_collate(blocks), head)
        alone = sum(token_loss_sum(model, pad_collate(2)([s]), head)[0] for s in samples)
    assert packed_tokens == sum(len(s["input_ids"]) - 1 for s in samples)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_lora_trains_and_saves_in_one_process(bits, tiny_model_dir, tmp_path):
    """bitsandbytes layers run forward and backward on CPU too; the adapter loads with peft."""
    summary = finetuning.main(**{**FAST, "save_model": True, "lr": 1e-2},
                              model_name=str(tiny_model_dir), use_peft=True, quantization=bits,
                              output_dir=str(tmp_path))
    untrained = finetuning.main(**{**FAST, "lr": 1e-12}, model_name=str(tiny_model_dir),
                                use_peft=True, quantization=bits,
                                output_dir=str(tmp_path / "untrained"))
    assert summary["eval_loss"][-1] < untrained["eval_loss"][-1]
    assert (tmp_path / "adapter_model.safetensors").is_file()
    quantized = [m for m in summary["model"].modules() if "bitsandbytes" in type(m).__module__]
    assert quantized, "no bitsandbytes layer in the model"


def test_lr_schedules():
    from llm_finetune.config_utils import build_run_config
    from llm_finetune.optim import lr_factor

    step = build_run_config(gamma=0.5).train
    assert [lr_factor(s, step, 10, 30) for s in (0, 9, 10, 25)] == [1.0, 1.0, 0.5, 0.25]
    warm = build_run_config(lr_scheduler="cosine", warmup_steps=4).train
    assert lr_factor(0, warm, 10, 24) == 0.25 and lr_factor(3, warm, 10, 24) == 1.0
    assert lr_factor(4, warm, 10, 24) == 1.0
    assert lr_factor(24, warm, 10, 24) == pytest.approx(0.0)
    linear = build_run_config(lr_scheduler="linear").train
    assert lr_factor(5, linear, 10, 10) == pytest.approx(0.5)


@pytest.mark.parametrize("setting", [
    {"gradient_clipping": True, "gradient_clipping_threshold": 1e-3},
    {"weight_decay": 0.5, "lr": 1e-2},
    {"lr_scheduler": "cosine", "warmup_steps": 2},
])
def test_optimisation_flags_change_training(setting, tiny_model_dir, tmp_path):
    def losses(**extra):
        summary = finetuning.main(**{**FAST, **extra}, model_name=str(tiny_model_dir),
                                  output_dir=str(tmp_path / "-".join(extra)))
        return [m["loss"] for m in summary["metrics"] if "loss" in m]

    assert losses(**setting)[1:] != pytest.approx(losses(lr=setting.get("lr", FAST["lr"]))[1:],
                                                  rel=1e-6)


def test_full_model_save_with_optimizer(tiny_model_dir, tmp_path):
    finetuning.main(**{**FAST, "save_model": True}, save_optimizer=True,
                    model_name=str(tiny_model_dir), output_dir=str(tmp_path))
    state = torch.load(tmp_path / "model" / "optimizer.pt", weights_only=True)
    assert state["state"], "AdamW moments were not saved"
    assert not list(tmp_path.glob("*.tmp")), "a temporary directory was left behind"


def test_flop_counter_measures_a_training_step(tiny_model_dir, tmp_path):
    summary = finetuning.main(**FAST, model_name=str(tiny_model_dir), flop_counter=True,
                              flop_counter_start=1, output_dir=str(tmp_path))
    # a step of forward + backward (+ recompute) is 6-8 x parameters x tokens, plus attention
    params = sum(p.numel() for p in summary["model"].parameters())
    flops = summary["flops_per_step"]
    assert 4 * params * 8 * 16 < flops < 20 * params * 8 * 512  # 8 samples of 16-512 tokens


def test_a_memory_snapshot_needs_a_gpu():
    """--memory_snapshot_step records the CUDA allocator: refused before anything loads where
    there is no GPU (tests/test_gpu.py writes one on a GPU), and a step below 0 anywhere."""
    with pytest.raises(ConfigError, match="no GPU is visible here"):
        validate(build_run_config(memory_snapshot_step=2), 1, False)
    with pytest.raises(ConfigError, match="an optimizer step"):
        validate(build_run_config(memory_snapshot_step=-1), 1, True)


@pytest.fixture
def snapshot_calls(monkeypatch):
    """The CUDA allocator's history calls, recorded instead of made (no GPU here)."""
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history",
                        lambda enabled="all", **_: calls.append(("record", enabled)))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot",
                        lambda path: calls.append(("dump", path)))
    return calls


@pytest.mark.parametrize("case", ["at the step, with the flop counter on it", "on an error",
                                  "a run ending first", "a resumed run past the step"])
def test_a_memory_snapshot_is_written_once_or_not_recorded(case, snapshot_calls, tmp_path):
    """The snapshot is dumped at the end of its step (also when the flop counter counts that
    step), or when training fails or ends before it; a run resumed past it records nothing."""
    from types import SimpleNamespace

    from llm_finetune.profiling import StepProfiler
    cfg = SimpleNamespace(memory_snapshot_step=2, flop_counter=case.startswith("at the step"),
                          flop_counter_start=1, use_profiler=False, output_dir=str(tmp_path))
    first = 3 if case.startswith("a resumed") else 1
    profiler = StepProfiler(cfg, is_main=True, first_step=first)
    for step in range(first, 2 if case != "at the step, with the flop counter on it" else 3):
        with profiler.step(step):
            pass
    profiler.close(RuntimeError("out of memory") if case == "on an error" else None)
    dumps = [path for kind, path in snapshot_calls if kind == "dump"]
    if case.startswith("a resumed"):
        assert snapshot_calls == []
    else:
        assert dumps == [str(tmp_path / "memory_snapshot" / "rank0.pickle")]
        assert snapshot_calls[0][0] == "record" and snapshot_calls[-1] == ("record", None)


def test_profiler_writes_a_trace(tiny_model_dir, tmp_path):
    finetuning.main(**{**FAST, "max_train_step": 7}, model_name=str(tiny_model_dir),
                    use_profiler=True, output_dir=str(tmp_path))
    assert list((tmp_path / "profiler").glob("*.pt.trace.json*"))


def test_flop_counter_and_profiler_are_exclusive():
    with pytest.raises(ConfigError, match="one of them"):
        validate(build_run_config(flop_counter=True, use_profiler=True), world_size=1, cuda=False)


@pytest.fixture
def tokenizer_with_added_token(tmp_path):
    """The tiny model's tokenizer with one token more than the model's embedding, and 40
    alpaca rows whose answers use it."""
    from transformers import AutoTokenizer

    from llm_finetune.model import BUILTIN_MODELS

    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    tokenizer.add_tokens(["<answer>"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    rows = [{"instruction": f"Add {i} and {i}.", "input": "", "output": f"<answer> {2 * i}"}
            for i in range(40)]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    return {"tokenizer_name": str(tmp_path / "tokenizer"),
            "alpaca_dataset.data_path": str(tmp_path / "data.json")}


def saved_as_transformers(summary, settings, tmp_path) -> str:
    """The run's saved model as a transformers directory, through our converters."""
    if settings.get("use_peft"):
        return convert.merge_adapters(settings["model_name"], summary["saved_to"],
                                      str(tmp_path / "merged"), dtype="float32")
    if settings.get("enable_fsdp"):  # SHARDED_STATE_DICT
        return convert.dcp_to_hf(summary["saved_to"], settings["model_name"],
                                 str(tmp_path / "converted"), dtype="float32",
                                 tokenizer_name=settings["tokenizer_name"])
    return summary["saved_to"]


@pytest.mark.parametrize("engine", [
    {},  # weights from disk: the new row from the old rows' mean
    {"enable_fsdp": True, "model_name": "tiny-llama"},  # on meta, resized before FSDP wraps it
    {"use_peft": True},  # the adapter holds the grown embedding (peft saves it)
])
def test_embeddings_grow_to_a_tokenizer_with_added_tokens(engine, tokenizer_with_added_token,
                                                           tiny_model_dir, tmp_path):
    settings = {"model_name": str(tiny_model_dir), **engine, **tokenizer_with_added_token}
    summary = finetuning.main(**{**FAST, "save_model": True, **settings},
                              output_dir=str(tmp_path / "out"))
    assert all(m["loss"] == m["loss"] for m in summary["metrics"] if "loss" in m)  # not NaN
    saved = AutoModelForCausalLM.from_pretrained(saved_as_transformers(summary, settings, tmp_path))
    assert saved.get_input_embeddings().weight.shape[0] == 1025  # 1024 + <answer>
    assert saved.get_output_embeddings().weight.shape[0] == 1025
    logits_of(saved)


def test_early_stopping_ends_the_run_when_the_eval_loss_stops_falling(tmp_path, monkeypatch):
    """Patience 2: epochs 3 and 4 do not beat epoch 2's eval loss, so epoch 5 never runs and
    the best epoch's model (epoch 2) is what remains."""
    rows = [{"instruction": f"Say {i}.", "output": f"{i} {i}"} for i in range(12)]
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    evals.write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    scripted = iter([3.0, 2.0, 2.5, 2.6, 1.0])
    real_evaluate = Trainer.evaluate

    def evaluate(self, loader):  # the real evaluation, with the eval loss the test needs
        return real_evaluate(self, loader) | {"eval_loss": next(scripted)}

    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    summary = finetuning.main(**{**FAST, "max_train_step": 0, "num_epochs": 5,
                                 "dataset": "file_dataset", "file_dataset.data_files": str(train),
                                 "file_dataset.eval_files": str(evals),
                                 "early_stopping_patience": 2, "save_model": True,
                                 "output_dir": str(tmp_path / "out")})
    assert summary["eval_loss"] == [3.0, 2.0, 2.5, 2.6]
    assert summary["stopped_early_after_epoch"] == 4 and summary["best_epoch"] == 2
    assert summary["steps"] == 4 * 2  # 8 rows in batches of 4: two steps an epoch


def test_early_stopping_needs_validation():
    with pytest.raises(ConfigError, match="--run_validation is off"):
        validate(build_run_config(early_stopping_patience=2, run_validation=False), 1, False)


def test_the_memory_peak_is_read_from_the_allocator_history():
    """memory_peak replays a snapshot's events: the peak is where most was allocated, what was
    live there is grouped by the library frame that allocated it, and memory allocated before
    recording (still held at the dump) is counted apart. Rank 1 records on GPU 1: its file is
    read there."""
    from llm_finetune.memory_peak import summary

    def frames(name):
        return [{"filename": "/x/torch/_tensor.py", "line": 1, "name": "inner"},
                {"filename": f"/x/site-packages/llm_finetune/{name}.py", "line": 7, "name": name}]

    gib = 2**30
    trace = [{"action": "alloc", "addr": 1, "size": 2 * gib, "frames": frames("optim")},
             {"action": "alloc", "addr": 2, "size": 3 * gib, "frames": frames("train")},
             {"action": "alloc", "addr": 3, "size": 1 * gib, "frames": frames("optim")},
             {"action": "free_completed", "addr": 2, "size": 3 * gib, "frames": []},
             {"action": "free_completed", "addr": 3, "size": 1 * gib, "frames": []},
             {"action": "alloc", "addr": 4, "size": 1 * gib, "frames": frames("train")}]
    held = [{"state": "active_allocated", "size": 4 * gib}, {"state": "active_allocated",
                                                             "size": 2 * gib},
            {"state": "active_allocated", "size": 1 * gib}, {"state": "inactive", "size": gib}]
    report = summary({"segments": [{"device": 1, "blocks": held}], "device_traces": [[], trace]})
    assert report.startswith("peak: 10.00 GiB allocated on GPU 1, at allocator event 2 of 6"), \
        report
    assert "4.00 GiB allocated before recording" in report
    lines = report.splitlines()
    optim = next(i for i, line in enumerate(lines) if "llm_finetune/optim.py:7" in line)
    train = next(i for i, line in enumerate(lines) if "llm_finetune/train.py:7" in line)
    assert "3.00 GiB in     2 allocations" in lines[optim] and optim < train
    assert "3.00 GiB in     1 allocation " in lines[train]
