"""Vision fine-tuning (issue #18) on the built-in tiny-mllama: solid-colour images captioned with
their colour's name, so the captions can only be learned by looking at the images."""

import copy
import io
import json
import math
import random
import runpy
import subprocess
import sys

import datasets
import pyarrow
import pyarrow.parquet
import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils.deprecation import deprecate_kwarg

from llm_finetune import finetuning, inference, plan
from llm_finetune.adapters import base_model_of
from llm_finetune.convert import dcp_to_hf, merge_adapters
from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.configs.recipes import RECIPES
from llm_finetune.data.files import load_files
from llm_finetune.data.images import image_collate
from llm_finetune.data.rows import DataError, turn_tokens
from llm_finetune.distributed import DistInfo
from llm_finetune.engine import checkpoint_forward
from llm_finetune.metrics import PhaseTimer
from llm_finetune.model import (image_encoder_layers, load_base_model, load_model,
                                load_processor)
from llm_finetune.precision import choose_precision
from llm_finetune.preflight import validate
from tests.helpers import REPO, torchrun
from tests.vision_dist_worker import VISION_CASES, fsdp_settings

# the data set docs/vision.md trains on
COLOUR_TOOL = runpy.run_path(str(REPO / "tools" / "make_colour_images.py"))
COLOURS, conversation = COLOUR_TOOL["COLOURS"], COLOUR_TOOL["conversation"]
write_colour_rows = COLOUR_TOOL["write_colour_rows"]
TINY_VLMS = runpy.run_path(str(REPO / "tools" / "make_tiny_vlms.py"))


@pytest.fixture(scope="module")
def colour_rows(tmp_path_factory):
    return write_colour_rows(tmp_path_factory.mktemp("colours"))


def settings(rows, **overrides) -> dict:
    return {"model_name": "tiny-mllama", "dataset": "file_dataset",
            "file_dataset.data_files": str(rows), "batch_size_training": 4, "val_batch_size": 4,
            "num_workers_dataloader": 0, "plot_metrics": False, **overrides}


def answers(model, processor) -> dict[str, str]:
    """What the model answers, greedily, for an image of each colour."""
    prompt = processor.apply_chat_template(conversation(None), add_generation_prompt=True)
    said = {}
    for name, rgb in COLOURS.items():
        batch = processor(text=prompt, images=[Image.new("RGB", (32, 32), rgb)],
                          add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=4, do_sample=False)
        said[name] = processor.decode(out[0, batch["input_ids"].shape[1]:],
                                      skip_special_tokens=True).strip()
    return said


@pytest.fixture(scope="module")
def colour_model(colour_rows, tmp_path_factory):
    """tiny-mllama fully fine-tuned on the colour set (six epochs): the run's summary and
    output directory."""
    out = tmp_path_factory.mktemp("colour_model")
    return finetuning.main(**settings(colour_rows, num_epochs=6, output_dir=str(out))), out


@pytest.fixture(scope="module")
def colour_adapter(colour_rows, tmp_path_factory):
    """A LoRA adapter trained on the colour set for one epoch: the summary and its directory."""
    out = tmp_path_factory.mktemp("colour_adapter")
    return finetuning.main(**settings(colour_rows, num_epochs=1, use_peft=True,
                                      output_dir=str(out))), out


def test_full_fine_tuning_learns_colours_and_saves_a_model_transformers_loads(colour_model):
    summary, out = colour_model
    losses = summary["eval_loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    saved = out / "model"
    model = AutoModelForImageTextToText.from_pretrained(saved).eval()
    processor = AutoProcessor.from_pretrained(saved)
    assert answers(model, processor) == {name: name for name in COLOURS}


def test_lora_adapts_the_language_model_only_and_loads_with_peft(colour_adapter):
    summary, tmp_path = colour_adapter
    adapted = [n for n, p in summary["model"].named_parameters() if p.requires_grad]
    assert adapted and all(".language_model." in n and "lora_" in n for n in adapted)
    base = load_base_model("tiny-mllama", torch.float32, adapter_dir=str(tmp_path))
    model = PeftModel.from_pretrained(base, tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert set(answers(model, processor)) == set(COLOURS)  # it generates from an image


def test_freeze_llm_only_trains_the_vision_side_and_cross_attention(colour_rows, tmp_path):
    run = build_run_config(**settings(colour_rows))
    before = load_model(run.train, torch.float32, on_meta=False).state_dict()
    summary = finetuning.main(**settings(colour_rows, num_epochs=1, max_train_step=4,
                                         freeze_LLM_only=True, save_model=False,
                                         output_dir=str(tmp_path)))
    cross = tuple(f"model.language_model.layers.{i}." for i in (1, 3))  # the config's
    for name, param in summary["model"].named_parameters():
        trains = name.startswith(("model.vision_model.", "model.multi_modal_projector.", *cross))
        assert param.requires_grad == trains, name
        assert trains or torch.equal(param.detach(), before[name]), name  # frozen: unchanged
    moved = [n for n, p in summary["model"].named_parameters() if p.requires_grad
             and not torch.equal(p.detach(), before[n])]
    assert any(n.startswith(cross) for n in moved) and any("vision_model" in n for n in moved)


def test_lora_on_the_image_encoder_trains_and_loads_with_peft(colour_model, colour_rows,
                                                             tmp_path):
    """--lora_config.vision_encoder: target_modules (q_proj, v_proj) are adapted in the image
    encoder's layers as well as the language model's, the encoder's adapters train, and peft
    loads the saved adapter onto its base with the trained model's outputs. The base is the
    fine-tuned colour model: a random-init mllama's cross-attention gates are zero, so no
    gradient reaches the image side until they train (full fine-tuning does that)."""
    base_dir = colour_model[1] / "model"
    # a saved model brings no recipe: tiny-mllama's
    summary = finetuning.main(**settings(colour_rows, **{
        **RECIPES["tiny-mllama"], "model_name": str(base_dir), "num_epochs": 1,
        "max_train_step": 8, "use_peft": True, "output_dir": str(tmp_path),
        "lora_config.vision_encoder": True}))
    trained = summary["model"].eval()
    adapted = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in adapted)
    vision = [n for n in adapted if ".vision_model." in n]
    assert vision and any(".language_model." in n for n in adapted)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in vision} == {"q_proj", "v_proj"}
    assert not any("multi_modal_projector" in n for n in adapted)
    moved = [n for n in vision if "lora_B" in n and trained.get_parameter(n).abs().sum() > 0]
    assert moved  # lora_B starts at zero: the encoder's adapters learned
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    processor = AutoProcessor.from_pretrained(tmp_path)
    batch = processor(text=processor.apply_chat_template(conversation(None),
                                                        add_generation_prompt=True),
                      images=[Image.new("RGB", (48, 24), COLOURS["blue"])],
                      add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained(**batch).logits)


def test_lora_on_the_image_encoder_needs_a_vision_model():
    with pytest.raises(ConfigError, match="vision_encoder adapts a vision model's image"):
        validate(build_run_config(model_name="tiny-llama", use_peft=True,
                                  **{"lora_config.vision_encoder": True}), 1, False)


def test_qlora_quantises_the_language_model_and_keeps_the_image_side(colour_rows, tmp_path):
    """--quantization 4bit on a vision model: the text decoder's linear layers are bitsandbytes
    4-bit, the image encoder and projector stay in full precision (as llama-recipes' users
    keep them), the adapters train and load with peft."""
    summary = finetuning.main(**settings(colour_rows, num_epochs=1, max_train_step=8,
                                         use_peft=True, quantization="4bit", lr=1e-2,
                                         output_dir=str(tmp_path)))
    losses = [record["loss"] for record in summary["metrics"] if "loss" in record]
    assert losses[-1] < losses[0]
    layers = {name: type(module).__name__ for name, module in summary["model"].named_modules()
              if type(module).__name__ in ("Linear", "Linear4bit") and ".lora_" not in name}
    image_side = {n: kind for n, kind in layers.items()
                  if ".vision_model." in n or ".multi_modal_projector" in n}
    text_side = {n: kind for n, kind in layers.items()
                 if ".language_model." in n and n not in image_side}
    assert image_side and set(image_side.values()) == {"Linear"}
    assert text_side and set(text_side.values()) == {"Linear4bit"}
    base = load_base_model("tiny-mllama", torch.float32, adapter_dir=str(tmp_path))
    model = PeftModel.from_pretrained(base, tmp_path).eval()
    assert set(answers(model, AutoProcessor.from_pretrained(tmp_path))) == set(COLOURS)


def test_freeze_llm_only_is_refused_with_adapters():
    with pytest.raises(ConfigError, match="only the adapters train"):
        validate(build_run_config(model_name="tiny-mllama", freeze_LLM_only=True,
                                  use_peft=True), 1, False)


def test_vision_settings_wait_for_a_hub_model_s_config():
    """Preflight does not reach the hub: a hub name's vision settings are not refused as if it
    were a causal LM (the run checks them once it has read the config); a local causal LM's
    are refused at once."""
    hub = dict(model_name="meta-llama/Llama-3.2-11B-Vision-Instruct", batching_strategy="padding")
    validate(build_run_config(**hub, freeze_LLM_only=True, images_per_sample=2), 1, False)
    validate(build_run_config(**hub, use_peft=True, **{"lora_config.vision_encoder": True}), 1,
             False)
    with pytest.raises(ConfigError, match="causal LM"):
        validate(build_run_config(model_name="tiny-llama", images_per_sample=2), 1, False)


def test_packing_is_refused_for_a_vision_model_with_the_fix(colour_rows):
    with pytest.raises(ConfigError, match="--batching_strategy padding"):
        validate(build_run_config(**settings(colour_rows, batching_strategy="packing")), 1,
                 False)


def test_rows_with_images_need_a_vision_model(colour_rows, tmp_path):
    with pytest.raises(DataError, match="need a vision model"):
        finetuning.main(**settings(colour_rows, model_name="tiny-llama",
                                   output_dir=str(tmp_path)))


@pytest.mark.parametrize("bad, reason", [
    ("missing", "image gone.png: no such file"),
    ("unreadable", "image broken.png cannot be read"),
    ("no_answer", "no non-empty assistant message"),
    ("count", "the messages hold 1 image part"),
])
def test_a_bad_row_is_reported_with_its_file_and_line(tmp_path, bad, reason):
    rows = write_colour_rows(tmp_path, rows=8)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    row = {"missing": {"images": ["gone.png"], "messages": conversation("red")},
           "unreadable": {"images": ["broken.png"], "messages": conversation("red")},
           "no_answer": {"images": ["images/0.png"], "messages": conversation(None)},
           "count": {"images": ["images/0.png", "images/1.png"],
                     "messages": conversation("red")}}[bad]
    lines = rows.read_text().splitlines()
    lines.insert(4, json.dumps(row))  # line 5
    rows.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"rows.jsonl line 5: {reason}"):
        finetuning.main(**settings(rows, output_dir=str(tmp_path / "out"),
                                   **{"file_dataset.val_split": 0.25}))


@pytest.fixture(scope="module")
def fsdp_runs(colour_rows, tmp_path_factory):
    """Every case of tests/vision_dist_worker.py in one torchrun launch: (each case's per-step
    losses, the directory holding each case's output_dir)."""
    out = tmp_path_factory.mktemp("vision_fsdp")
    TINY_VLMS["tiny_llava"](colour_rows.parent / "tiny-llava")  # the "llava" case's model
    torchrun(REPO / "tests" / "vision_dist_worker.py", str(out), str(colour_rows))
    return json.loads((out / "results.json").read_text()), out


@pytest.fixture(scope="module")
def fsdp_losses(fsdp_runs):
    return fsdp_runs[0]


@pytest.mark.parametrize("case", list(VISION_CASES))
def test_fsdp_on_two_ranks_matches_one_process(case, fsdp_losses, colour_rows, tmp_path):
    """FSDP finds the image encoder's and the text decoder's layers (self- and cross-attention)
    as its units, and two ranks of 2 samples train as one process of 4."""
    kwargs = fsdp_settings(str(colour_rows), case)
    kwargs.update(batch_size_training=4, val_batch_size=4)
    summary = finetuning.main(**kwargs, output_dir=str(tmp_path))
    single = [record["loss"] for record in summary["metrics"] if "loss" in record]
    assert len(single) == 4
    # QLoRA under FSDP computes in bf16 (4-bit weights stored as bf16); as in
    # tests/test_distributed.py, it is compared within 1e-3 (measured 1.6e-4)
    assert fsdp_losses[case] == pytest.approx(single, rel=1e-3 if case == "qlora" else 1e-5)


def test_low_cpu_fsdp_loads_a_vision_model_on_rank_0_only(fsdp_losses):
    """--low_cpu_fsdp with tiny-mllama's weights on disk: rank 0 reads them, rank 1 builds on
    the meta device and receives its shards; every step's loss equals the run that initialised
    the same weights from the seed on each rank (the "full" case)."""
    assert fsdp_losses["on_meta"]["low_cpu_fsdp"] == [[False], [True]]  # rank 0 reads
    assert len(fsdp_losses["low_cpu_fsdp"]) == 4
    assert fsdp_losses["low_cpu_fsdp"] == pytest.approx(fsdp_losses["full"], rel=1e-6)


def colour_image(directory, name: str, size=(32, 32)):
    path = directory / f"{name}.png"
    Image.new("RGB", size, COLOURS[name]).save(path)
    return path


def test_inference_answers_the_colour_of_an_image(colour_model, tmp_path, capsys):
    """``python -m llm_finetune.inference --image_path``: the question about the image goes
    through the processor's chat template, and the trained model names each image's colour."""
    _, out = colour_model
    question = conversation(None)[0]["content"][1]["text"]
    for name in COLOURS:
        inference.main(str(out / "model"), image_path=str(colour_image(tmp_path, name)),
                       prompt=question, do_sample=False, max_new_tokens=4)
        printed = capsys.readouterr().out
        assert printed.strip() == name, printed  # streamed: the answer alone
    # the command line, a prompt list in one batch about a two-tile image
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{question}\n{question}\n")
    done = subprocess.run([sys.executable, "-m", "llm_finetune.inference", "--model_name",
                           str(out / "model"), "--image_path",
                           str(colour_image(tmp_path, "blue", size=(48, 24))), "--prompt_file",
                           str(prompts), "--prompt_list", "--do_sample", "False",
                           "--max_new_tokens", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count(f"### {question}\nblue\n") == 2, done.stdout


def test_inference_from_an_adapter_on_the_seeded_base(colour_adapter, tmp_path, monkeypatch):
    """base + --peft_model: the adapter's processor and the base rebuilt from its seed give the
    same answers as the PeftModel the run trained."""
    _, adapter = colour_adapter
    calls = []
    real_load = inference.load
    monkeypatch.setattr(inference, "load",
                        lambda *a, **k: calls.append(real_load(*a, **k)) or calls[-1])
    inference.main("tiny-mllama", peft_model=str(adapter),
                   image_path=str(colour_image(tmp_path, "red")), prompt="What colour is this?",
                   do_sample=False, max_new_tokens=4)
    model, processor = calls[0]
    assert isinstance(model, PeftModel)
    base = load_base_model("tiny-mllama", torch.float32, adapter_dir=str(adapter))
    expected = PeftModel.from_pretrained(base, adapter).eval()
    assert answers(model, processor) == answers(expected, AutoProcessor.from_pretrained(adapter))


@pytest.mark.parametrize("case, message", [
    ("missing", "--image_path .*gone.png: no such file"),
    ("unreadable", "cannot be read as an image"),
    ("text_model", "tiny-llama is a text-only causal LM"),
    ("padding", "drop --max_padding_length"),
])
def test_image_inference_that_cannot_run_is_refused_before_loading(case, message, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    flags = {"missing": dict(image_path=str(tmp_path / "gone.png")),
             "unreadable": dict(image_path=str(tmp_path / "broken.png")),
             "text_model": dict(model_name="tiny-llama",
                                image_path=str(colour_image(tmp_path, "red"))),
             "padding": dict(image_path=str(colour_image(tmp_path, "red")),
                             max_padding_length=64)}[case]
    with pytest.raises(ConfigError, match=message):
        inference.main(**{"model_name": "tiny-mllama", "prompt": "What colour is this?",
                          **flags})


def test_sharded_state_dict_converts_to_a_model_transformers_loads(fsdp_runs, tmp_path):
    """SHARDED_STATE_DICT under FSDP, converted by ``convert dcp_to_hf`` (the model named by the
    train_params.yaml beside the shards): plain AutoModelForImageTextToText loads every weight,
    equal to the same run saved as FULL_STATE_DICT, and AutoProcessor loads the processor."""
    losses, out = fsdp_runs
    assert losses["sharded_state_dict"] == losses["full_state_dict"]  # the same run
    dcp_to_hf(str(out / "sharded_state_dict" / "fine-tuned-tiny-mllama"),
              output=str(tmp_path / "hf"), dtype="float32")
    converted, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf",
                                                                  output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    reference = AutoModelForImageTextToText.from_pretrained(out / "full_state_dict" / "model")
    expected = reference.state_dict()
    assert converted.state_dict().keys() == expected.keys()
    for name, tensor in converted.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    processor = AutoProcessor.from_pretrained(tmp_path / "hf")
    assert answers(converted.eval(), processor) == answers(reference.eval(), processor)


def test_fsdp_lora_resumes_exactly_on_the_default_path(fsdp_losses):
    """2 ranks, LoRA with dropout, a loader worker, 2 accumulation steps: resumed from the
    checkpoint of step 2, steps 3-4 repeat the uninterrupted run."""
    straight = fsdp_losses["lora_default_path"]
    assert len(straight) == 4
    assert fsdp_losses["lora_default_path_resumed"] == straight[2:]


@pytest.mark.parametrize("extra", [{}, {"use_peft": True}], ids=["full", "lora"])
def test_stopped_and_resumed_vision_run_continues_the_same_curve(extra, colour_rows, tmp_path):
    """One process on the default path (a loader worker, LoRA dropout), 2 accumulation steps:
    stopped after step 3, resumed with --resume_from_checkpoint auto from the checkpoint of
    step 2, steps 3-4 repeat the uninterrupted run bit for bit."""
    kwargs = settings(colour_rows, num_workers_dataloader=1, batch_size_training=2,
                      gradient_accumulation_steps=2, max_train_step=8, run_validation=False,
                      save_model=False, lr_scheduler="step", **extra)
    run = build_run_config(**kwargs)
    assert run.train.num_workers_dataloader >= 1 and run.peft.lora_dropout > 0

    def losses(summary):
        return [record["loss"] for record in summary["metrics"] if "loss" in record]

    straight = losses(finetuning.main(**kwargs, output_dir=str(tmp_path / "straight")))
    assert len(straight) == 4
    out = tmp_path / "stopped"
    first = finetuning.main(**{**kwargs, "max_train_step": 6}, save_steps=2, output_dir=str(out))
    assert losses(first) == straight[:3]
    resumed = finetuning.main(**kwargs, resume_from_checkpoint="auto", output_dir=str(out))
    assert losses(resumed) == straight[2:]


def test_merged_adapter_loads_without_peft(colour_adapter, tmp_path):
    """``convert merge_adapters`` on a vision LoRA adapter: a model and processor that plain
    transformers loads, answering as the PeftModel does."""
    _, adapter = colour_adapter
    merge_adapters("tiny-mllama", str(adapter), str(tmp_path / "merged"), dtype="float32")
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "merged")
    base = load_base_model("tiny-mllama", torch.float32, adapter_dir=str(adapter))
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    assert answers(merged, processor) == answers(peft_model, processor)


# --- activation checkpointing of the image encoder ----------------------------------------------

METHODS = {"full": {}, "lora": {"use_peft": True}, "freeze_LLM_only": {"freeze_LLM_only": True},
           "vision_lora": {"use_peft": True, "lora_config.vision_encoder": True}}


def two_image_batch(processor) -> dict:
    """Two rows, each asking about a two-tile image, labelled on every token but the image's."""
    prompt = processor.apply_chat_template(conversation("red"))
    images = [[Image.new("RGB", (48, 24), COLOURS[name])] for name in ("red", "blue")]
    batch = dict(processor(text=[prompt] * 2, images=images, add_special_tokens=False,
                           return_tensors="pt"))
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    batch["labels"] = batch["input_ids"].masked_fill(batch["input_ids"] == image_token, -100)
    return batch


def built_model(processor, batch, **flags):
    """tiny-mllama as a run builds it, in fp32 on CPU, for micro-batches like ``batch``."""
    run = build_run_config(model_name="tiny-mllama", batch_size_training=2,
                           context_length=batch["input_ids"].shape[1], mixed_precision=False,
                           **flags)
    model, _, _ = finetuning.build_model(run, choose_precision(run, cuda=False),
                                         processor.tokenizer,
                                         DistInfo(0, 0, 1, torch.device("cpu")),
                                         PhaseTimer(verbose=False), vision=True)
    return model


@pytest.mark.parametrize("method", list(METHODS))
def test_the_image_encoder_is_recomputed_only_when_it_trains(method):
    """With checkpointing on, each image encoder layer runs again in backward (its first norm
    is called twice per step; the recompute stops once it has what backward needs) when the
    image side trains, and once when it is frozen (LoRA on the language model: it keeps
    nothing, so there is nothing to recompute)."""
    processor = load_processor(build_run_config(model_name="tiny-mllama").train)
    batch = two_image_batch(processor)
    model = built_model(processor, batch, **METHODS[method])
    encoder = image_encoder_layers(model)
    assert len(encoder) == 3  # tiny-mllama's 2 local and 1 global layers
    calls = {id(layer): 0 for layer in encoder}
    for layer in encoder:
        layer.input_layernorm.register_forward_hook(
            lambda *_, key=id(layer): calls.__setitem__(key, calls[key] + 1))
    model(**batch).loss.backward()
    trains = method != "lora"
    assert set(calls.values()) == {2 if trains else 1}, calls


def open_gates(model) -> None:
    """Cross-attention gates start at zero in a random-init mllama, so no gradient would reach
    the image side: open them, so the encoder's gradients are not all zero."""
    for name, param in model.named_parameters():
        if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate")):
            param.data.fill_(0.5)


@pytest.mark.parametrize("method", ["full", "vision_lora"])
def test_a_checkpointed_image_encoder_gives_the_same_loss_and_gradients(method):
    """fp32 on CPU: the loss and every gradient, the image encoder's included (not zero), are
    those of the same model trained without checkpointing."""
    processor = load_processor(build_run_config(model_name="tiny-mllama").train)
    batch = two_image_batch(processor)
    results = []
    for checkpointing in (False, True):
        model = built_model(processor, batch, **METHODS[method],
                            **{"fsdp_config.fsdp_activation_checkpointing": checkpointing})
        open_gates(model)
        torch.manual_seed(0)
        loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                        if p.requires_grad}))
    (loss, grads), (checkpointed_loss, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed_loss, loss, rtol=0, atol=0)
    assert grads.keys() == checkpointed_grads.keys()
    encoder = [n for n in grads if ".vision_model." in n and grads[n].abs().sum() > 0]
    assert any(".transformer.layers." in n for n in encoder)
    assert any(".global_transformer.layers." in n for n in encoder)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-6, atol=1e-7,
                                   msg=name)



class RenamedKeywordLayer(torch.nn.Module):
    """A layer whose input keyword was renamed, as transformers 5.17 has mllama's image encoder
    layers (called with ``hidden_state=``, the signature says ``hidden_states``)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    @deprecate_kwarg("hidden_state", new_name="hidden_states", version="v99")
    def forward(self, hidden_states, attention_mask=None):
        return torch.tanh(self.linear(hidden_states))


def test_a_checkpointed_layer_takes_the_keywords_its_caller_gives():
    """The GPU run of --freeze_LLM_only on transformers 5.17 failed in the first forward: the
    checkpointed forward bound its arguments to the signature, which had no ``hidden_state``."""
    layer = RenamedKeywordLayer()
    inputs = torch.randn(3, 4, requires_grad=True)
    expected = layer(hidden_state=inputs)
    (expected_grad,) = torch.autograd.grad(expected.sum(), inputs)
    checkpoint_forward(layer)
    output = layer(hidden_state=inputs)
    (grad,) = torch.autograd.grad(output.sum(), inputs)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)

# --- the memory planner ------------------------------------------------------------------------

def saved_for_backward(model, batch) -> int:
    """Bytes of the tensors one forward keeps for backward (each storage once, weights not
    counted): what the planner's activation parts predict."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch)
    return sum(saved.values())


@pytest.mark.parametrize("checkpointing", [False, True], ids=["all", "checkpointed"])
@pytest.mark.parametrize("method", [{}, {"use_peft": True}, {"freeze_LLM_only": True},
                                    {"use_peft": True, "lora_config.vision_encoder": True}],
                         ids=["full", "lora", "freeze_LLM_only", "vision_lora"])
def test_planned_activations_are_what_a_forward_keeps(method, checkpointing):
    """tiny-mllama built as the run builds it, in fp32 on CPU: what one forward of two-tile
    images keeps for backward (text layers, image encoder, cross-attention over the image
    tokens; the loss apart) is within 25% of the planner's activation parts for the same
    batch, with and without checkpointing. (A frozen image encoder keeps nothing: with LoRA
    and checkpointing, transformers' input-grad hook would otherwise make it keep everything,
    3.7 times the plan.)"""
    processor = load_processor(build_run_config(model_name="tiny-mllama").train)
    prompt = processor.apply_chat_template(conversation("red"))
    images = [[Image.new("RGB", (48, 24), COLOURS["red"])] for _ in range(2)]
    batch = dict(processor(text=[prompt] * 2, images=images, add_special_tokens=False,
                           return_tensors="pt"))
    run = build_run_config(model_name="tiny-mllama", batch_size_training=2,
                           context_length=batch["input_ids"].shape[1], mixed_precision=False,
                           **{"fsdp_config.fsdp_activation_checkpointing": checkpointing},
                           **method)
    precision = choose_precision(run, cuda=False)
    model, _, _ = finetuning.build_model(run, precision, processor.tokenizer,
                                         DistInfo(0, 0, 1, torch.device("cpu")),
                                         PhaseTimer(verbose=False), vision=True)
    measured = saved_for_backward(base_model_of(model).model, batch)  # up to the output layer
    planned = plan.estimate(run, 1).gpu
    activations = sum(v for k, v in planned.items()
                      if k.startswith(("activations", "image encoder", "cross-attention")))
    assert 0.75 <= measured / activations <= 1.25, (measured, planned)


def test_the_11b_vision_shape_is_planned():
    """llama3.2-11b-vision: Llama-3.2-11B-Vision's 10.67B parameters, random-init; the plan of
    llama-recipes' --freeze_LLM_only recipe on 4 GPUs prints with the image parts (the encoder
    trains, so its activations count), and LoRA on the language model leaves them out."""
    settings = dict(model_name="llama3.2-11b-vision", batching_strategy="padding",
                    enable_fsdp=True, batch_size_training=2, context_length=2048)
    text = plan.main(world_size=4, gpu_memory="80GiB", freeze_LLM_only=True, **settings)
    assert "llama3.2-11b-vision, 10.67B parameters" in text
    assert ("image encoder activations (2 images x 6432 patches, checkpointed: 40 layer "
            "inputs)") in text
    assert "cross-attention over 12808 image tokens (0 of 8 layers kept)" in text
    assert "fits:" in text and "one image of 4 tiles per sequence" in text
    # checkpointing covers the image encoder: its 40 layers keep their inputs, not all they hold
    plans = {checkpointing: plan.estimate(build_run_config(
        freeze_LLM_only=True, **{"fsdp_config.fsdp_activation_checkpointing": checkpointing},
        **settings), 4) for checkpointing in (True, False)}
    encoder = {checkpointing: sum(v for k, v in p.gpu.items() if k.startswith("image encoder"))
               for checkpointing, p in plans.items()}
    assert encoder[True] < encoder[False] / 10, encoder
    lora = plan.estimate(build_run_config(use_peft=True, **settings), 4)
    assert not any(k.startswith("image encoder") for k in lora.gpu)
    assert plan.count_parameters(build_run_config(**settings)).num_layers == 40  # text layers


def test_dry_run_plans_a_vision_run(capsys, tmp_path):
    summary = finetuning.main(model_name="tiny-mllama", dry_run=True, auto_fit=True,
                              gpu_memory="1GiB", output_dir=str(tmp_path))
    assert "cross-attention over" in summary["plan"] and "auto_fit:" in capsys.readouterr().out
    assert not (tmp_path / "metrics.jsonl").exists()


# --- llama-recipes' custom vision data set (OCRVQA recipe) ---------------------------------------

VISION_DATASET = REPO / "examples" / "vision_dataset.py"


def test_the_example_collator_learns_the_answers_only(colour_rows):
    """examples/vision_dataset.py's batches: the image inputs from the processor, and labels on
    each answer and its end of turn, nothing of the question or the image token."""
    processor = load_processor(build_run_config(model_name="tiny-mllama").train)
    module = runpy.run_path(str(VISION_DATASET))
    config = build_run_config(dataset="custom_dataset",
                              **{"custom_dataset.data_path": str(colour_rows.parent /
                                                                 "texts.jsonl")}).dataset
    rows = module["get_custom_dataset"](config, processor, "train")
    assert len(rows) == 57 and len(module["get_custom_dataset"](config, processor, "test")) == 7
    batch = module["get_data_collator"](processor)([rows[i] for i in range(3)])
    assert {"pixel_values", "aspect_ratio_ids", "cross_attention_mask"} <= set(batch)
    for row in range(3):
        learned = batch["labels"][row][batch["labels"][row] != -100]
        assert processor.tokenizer.decode(learned) == rows[row]["texts"][0]["assistant"] + "</s>\n"


def test_custom_dataset_file_trains_tiny_mllama(colour_rows, tmp_path):
    """--dataset custom_dataset --custom_dataset.file examples/vision_dataset.py: the run
    hands the file's functions the processor; the model learns each colour from its image."""
    summary = finetuning.main(**{
        **settings(colour_rows, num_epochs=6, output_dir=str(tmp_path)),
        "dataset": "custom_dataset", "custom_dataset.file": str(VISION_DATASET),
        "custom_dataset.data_path": str(colour_rows.parent / "texts.jsonl")})
    assert summary["eval_loss"][-1] < 0.5 * summary["eval_loss"][0]
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "model").eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    assert answers(model, processor) == {name: name for name in COLOURS}


# --- DPO with images ---------------------------------------------------------------------------

def write_colour_pairs(directory, rows: int = 64):
    """tools/make_colour_images.py's preference pairs: the right colour chosen, another
    rejected."""
    return write_colour_rows(directory, rows=rows).parent / "pairs.jsonl"


@pytest.fixture(scope="module")
def open_gated_base(tmp_path_factory):
    """tiny-mllama saved with its cross-attention gates open (random-init ones are zero, so
    nothing of the image would reach the text) and its processor: a base for LoRA on which
    the answer can depend on the image."""
    out = tmp_path_factory.mktemp("open_gates")
    run = build_run_config(model_name="tiny-mllama")
    model = load_model(run.train, torch.float32, on_meta=False)
    open_gates(model)
    model.save_pretrained(out)
    load_processor(run.train).save_pretrained(out)
    return out


def test_dpo_with_images_prefers_the_right_colour(open_gated_base, tmp_path):
    """--method dpo --use_peft on pairs with images: each sequence gets its pair's image, the
    reference is the model with its LoRA off (the first step's loss is log 2), the loss falls,
    and on held-out images the right colour gets the larger reward."""
    pairs = write_colour_pairs(tmp_path)
    summary = finetuning.main(**{
        **RECIPES["tiny-mllama"], "model_name": str(open_gated_base), "method": "dpo",
        "use_peft": True, "dataset": "file_dataset", "file_dataset.data_files": str(pairs),
        "file_dataset.val_split": 0.25, "batch_size_training": 4, "val_batch_size": 4,
        "num_workers_dataloader": 0, "num_epochs": 3, "lr": 3e-2, "dpo_beta": 0.5,
        "save_model": False, "plot_metrics": False, "output_dir": str(tmp_path / "out")})
    steps = [record for record in summary["metrics"] if "loss" in record]
    assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference
    third = len(steps) // 3
    first, last = steps[:third], steps[-third:]
    assert sum(s["loss"] for s in last) < 0.6 * sum(s["loss"] for s in first)
    # 16 held-out pairs: which colour is right can only be read from the image
    assert summary["eval_reward_accuracy"][-1] >= 0.9, summary["eval_reward_accuracy"]
    assert summary["eval_loss"][-1] < math.log(2) - 0.3, summary["eval_loss"]


@pytest.mark.parametrize("bad, reason", [
    ("missing", "image gone.png: no such file"),
    ("text_prompt", "a pair with images is conversational"),
    ("count", "prompt \\+ 'chosen' hold 1 image part"),
])
def test_a_bad_image_pair_is_named_by_file_and_line(bad, reason, tmp_path):
    pairs = write_colour_pairs(tmp_path, rows=8)
    row = json.loads(pairs.read_text().splitlines()[0])
    row.update({"missing": {"images": ["gone.png"]},
                "text_prompt": {"prompt": "What colour is this?"},
                "count": {"images": ["images/0.png", "images/1.png"]}}[bad])
    lines = pairs.read_text().splitlines()
    lines.insert(4, json.dumps(row))  # line 5
    pairs.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"pairs.jsonl line 5: {reason}"):
        finetuning.main(**settings(pairs, method="dpo", use_peft=True,
                                   output_dir=str(tmp_path / "out"),
                                   **{"file_dataset.val_split": 0.25}))


def test_image_pairs_need_a_vision_model(tmp_path):
    pairs = write_colour_pairs(tmp_path, rows=8)
    with pytest.raises(DataError, match="preference pairs with 'images' need a vision model"):
        finetuning.main(**settings(pairs, model_name="tiny-llama", method="dpo", use_peft=True,
                                   output_dir=str(tmp_path / "out")))


def test_the_plan_of_image_pairs_counts_both_sequences_images():
    """A DPO pair is two sequences through one forward, each with the pair's image."""
    def image_rows(**flags):
        run = build_run_config(model_name="tiny-mllama", batch_size_training=2,
                               **{"lora_config.vision_encoder": True}, use_peft=True, **flags)
        return [k for k in plan.estimate(run, 1).gpu if k.startswith(("image", "cross"))]

    assert image_rows() == ["image encoder activations (2 images x 48 patches, checkpointed: "
                            "3 layer inputs)", "cross-attention over 68 image tokens (0 of 2 "
                            "layers kept)"]
    assert image_rows(method="dpo") == [
        "image encoder activations (4 images x 48 patches, checkpointed: 3 layer inputs)",
        "cross-attention over 136 image tokens (0 of 2 layers kept)"]


def test_a_deep_copy_recomputes_its_own_encoder_layers():
    """Full fine-tuning DPO's reference is a deep copy of the model: each copied encoder layer's
    checkpointed forward is bound to the copy, not to the layer it was copied from (which
    trains on)."""
    processor = load_processor(build_run_config(model_name="tiny-mllama").train)
    model = built_model(processor, two_image_batch(processor))
    copied = copy.deepcopy(model)
    for original, layer in zip(image_encoder_layers(model), image_encoder_layers(copied)):
        assert original.forward.args[0] is original and layer.forward.args[0] is layer


# --- image data in the rows, and several images per row ------------------------------------------

SECOND = "What colour is the second image?"


def two_image_conversation(answer: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                         {"type": "text", "text": SECOND}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def png_bytes(name: str, size=(32, 32)) -> bytes:
    data = io.BytesIO()
    Image.new("RGB", size, COLOURS[name]).save(data, format="PNG")
    return data.getvalue()


def write_image_data_parquet(path, rows: int, seed: int = 0):
    """Rows of two images each, as ``datasets`` writes its ``Image`` feature to Parquet (the
    images' bytes in the file), asking for the second image's colour."""
    rng = random.Random(seed)
    names = [(rng.choice(sorted(COLOURS)), rng.choice(sorted(COLOURS))) for _ in range(rows)]
    features = datasets.Features({"images": datasets.List(datasets.Image()),
                                  "messages": datasets.List({
                                      "role": datasets.Value("string"),
                                      "content": datasets.List({
                                          "type": datasets.Value("string"),
                                          "text": datasets.Value("string")})})})
    datasets.Dataset.from_list(
        [{"images": [{"bytes": png_bytes(first), "path": None},
                     {"bytes": png_bytes(second, (48, 24)), "path": f"{second}.png"}],
          "messages": two_image_conversation(second)} for first, second in names],
        features=features).to_parquet(str(path))
    return path


def test_parquet_rows_of_image_data_with_two_images_train(tmp_path, capsys):
    """A Parquet file of datasets' Image feature (bytes, no files), two images per row: the
    run trains on it (the loss falls), and the plan that --auto_fit (as the GPU defaults)
    made for one image per row before the data was read is made again for two."""
    rows = write_image_data_parquet(tmp_path / "rows.parquet", 32)
    summary = finetuning.main(**settings(rows, num_epochs=3, run_validation=False,
                                         save_model=False, output_dir=str(tmp_path / "out"),
                                         auto_fit=True, gpu_memory="8GiB"))
    losses = [record["loss"] for record in summary["metrics"] if "loss" in record]
    assert losses[-1] < 0.5 * losses[0], losses
    assert ("rows hold up to 2 images and the memory plan counted 1: planned again with "
            "--images_per_sample 2") in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert saved["train_config"]["images_per_sample"] == 2


def test_a_batch_of_one_and_two_image_rows(colour_rows):
    """The collator on rows of two images and of one (bytes and a file): each row's images in
    its order, a row's text attending to both of its images after their tokens and the
    one-image row to no second image, labels on the answers only."""
    processor = load_processor(build_run_config(model_name="tiny-mllama").train)
    collate = image_collate(processor)
    rows = [(two_image_conversation("blue"), [{"bytes": png_bytes("red"), "path": ""},
                                              {"bytes": png_bytes("blue", (48, 24)), "path": ""}]),
            (conversation("green"), [{"bytes": b"", "path": str(colour_image(colour_rows.parent,
                                                                             "green"))}])]
    samples = []
    for messages, images in rows:
        ids, labels, text = turn_tokens(processor.tokenizer, messages,
                                        processor.apply_chat_template)
        samples.append({"input_ids": ids, "labels": labels, "text": text, "images": images})
    batch = collate(samples)
    assert batch["pixel_values"].shape[:2] == (2, 2)  # rows x images (the second row padded)
    red, blue = (batch["pixel_values"][0, i, 0].mean((1, 2)) for i in range(2))
    assert red[0] > red[2] and blue[2] > blue[0]  # in the row's order: red, then blue
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    mask = batch["cross_attention_mask"]
    first, second = (batch["input_ids"][0] == image_token).nonzero().flatten().tolist()
    last = int(batch["attention_mask"][0].sum()) - 1
    assert mask[0, last, 0].sum() == 1 and mask[0, last, 1].sum() == 2  # 1 tile, then 2 tiles
    assert mask[0, :first].sum() == 0 and mask[0, :second, 1].sum() == 0
    assert mask[1, :, 1].sum() == 0  # the one-image row has no second image
    for row, answer in enumerate(("blue", "green")):
        learned = batch["labels"][row][batch["labels"][row] != -100]
        assert answer in processor.tokenizer.decode(learned)
        assert SECOND not in processor.tokenizer.decode(learned)


def test_image_data_rows_are_read_and_bad_ones_named(tmp_path):
    """Images as raw bytes (a Parquet binary column, no datasets metadata) and as datasets'
    ``{"bytes": None, "path"}`` in JSON lines (the path relative to the file): both tokenise,
    keeping bytes or the file's path (never pixels); undecodable bytes are a bad row named by
    file and row, which --bad_rows skip drops."""
    processor = load_processor(build_run_config(model_name="tiny-mllama").train)

    def load(rows, bad_rows="fail"):
        config = build_run_config(**settings(rows, **{"file_dataset.eval_files": str(rows)}))
        return load_files(config.dataset, processor.tokenizer, "train", 512, bad_rows, 0,
                          processor=processor)

    raw = tmp_path / "raw.parquet"
    images = [[png_bytes(name)] for name in ("red", "blue", "green")]
    images[2] = [b"not an image"]
    pyarrow.parquet.write_table(pyarrow.table({
        "images": images, "messages": [conversation(name) for name in ("red", "blue", "green")]}),
        raw)
    with pytest.raises(DataError, match=r"raw.parquet row 2: image data \(12 bytes\) cannot be "
                                        "read"):
        load(raw)
    kept = load(raw, bad_rows="skip")
    assert len(kept) == 2 and kept[0]["images"] == [{"bytes": images[0][0], "path": ""}]
    lines = tmp_path / "sub" / "rows.jsonl"
    lines.parent.mkdir()
    lines.write_text(json.dumps({"images": [{"bytes": None, "path": "../red.png"}],
                                 "messages": conversation("red")}) + "\n")
    red = colour_image(tmp_path, "red")
    (sample,) = load(lines)
    assert sample["images"] == [{"bytes": b"", "path": str(red.resolve())}]


def test_the_plan_counts_images_per_sample():
    """--images_per_sample N: the image encoder's and the cross-attention parts grow N-fold
    (every image goes through the encoder and is attended to), the text's parts stay; it is
    refused on a text-only model."""
    def plan_of(n):
        run = build_run_config(model_name="tiny-mllama", batch_size_training=2,
                               images_per_sample=n)
        validate(run, 1, False)
        return plan.estimate(run, 1)

    one, three = plan_of(1), plan_of(3)

    def image_parts(p):
        return sum(v for k, v in p.gpu.items() if k.startswith(("image encoder", "cross")))

    assert image_parts(three) == pytest.approx(3 * image_parts(one))
    assert any(k.startswith("image encoder activations (6 images") for k in three.gpu)
    text = {k: v for k, v in one.gpu.items() if k.startswith(("activations", "logits", "weights"))}
    assert text and all(three.gpu[k] == v for k, v in text.items())
    assert any("planned for 3 images" in note for note in three.notes)
    with pytest.raises(ConfigError, match="--images_per_sample plans a vision model's images"):
        validate(build_run_config(model_name="tiny-llama", images_per_sample=2), 1, False)


def test_inference_asks_about_several_images(colour_model, tmp_path, monkeypatch, capsys):
    """``--image_path red.png,blue.png``: one user turn with an image part per image, in their
    order, through the processor to the trained model, which answers; fire hands ``a,b`` over
    as a tuple, read the same way."""
    asked = []
    real_generate = inference.generate_rendered

    def generate_rendered(*args, **kwargs):
        answers = real_generate(*args, **kwargs)
        asked.append((args[2], kwargs["images"], answers))
        return answers

    monkeypatch.setattr(inference, "generate_rendered", generate_rendered)
    paths = [str(colour_image(tmp_path, name)) for name in ("red", "blue")]
    inference.main(str(colour_model[1] / "model"), image_path=",".join(paths),
                   prompt=SECOND, do_sample=False, max_new_tokens=4)
    ((texts, images, answers),) = asked
    assert texts[0].count("<|image|>") == 2 and SECOND in texts[0]
    assert [image.getpixel((0, 0)) for image in images[0]] == [COLOURS["red"], COLOURS["blue"]]
    assert len(answers) == 1 and answers[0].strip()  # the model answered
    assert answers[0].strip() in capsys.readouterr().out  # and the command printed it
    assert inference.image_paths(("a.png", "b.png")) == inference.image_paths("a.png, b.png")
