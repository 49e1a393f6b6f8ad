"""Vision families other than mllama (issue #18), on tiny random-init models that
tools/make_tiny_vlms.py writes: LLaVA trains end to end (its processor expands ``<image>`` into
one token per patch, its image encoder is a CLIP model); Qwen2-VL's model is found, and its
processor, which transformers builds only with torchvision, is refused naming it."""

import runpy

import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import is_torchvision_available

from llm_finetune import finetuning, plan
from llm_finetune.plan import apply_gpu_defaults
from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.data.images import IGNORE, image_collate
from llm_finetune.data.rows import turn_tokens
from llm_finetune.loss import model_inputs
from llm_finetune.model import image_encoder_layers, load_base_model, load_model, text_layers
from tests.helpers import REPO

TINY = runpy.run_path(str(REPO / "tools" / "make_tiny_vlms.py"))
COLOUR_TOOL = runpy.run_path(str(REPO / "tools" / "make_colour_images.py"))
COLOURS, conversation = COLOUR_TOOL["COLOURS"], COLOUR_TOOL["conversation"]


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    """tiny-llava, tiny-qwen2-vl and 16 colour rows in one directory."""
    out = tmp_path_factory.mktemp("families")
    TINY["tiny_llava"](out / "tiny-llava")
    TINY["tiny_qwen2_vl"](out / "tiny-qwen2-vl")
    COLOUR_TOOL["write_colour_rows"](out / "colours", rows=16)
    return out


def llava_settings(family_dir, **overrides) -> dict:
    return {"model_name": str(family_dir / "tiny-llava"), "dataset": "file_dataset",
            "file_dataset.data_files": str(family_dir / "colours" / "rows.jsonl"),
            "batching_strategy": "padding", "context_length": 256, "batch_size_training": 4,
            "val_batch_size": 4, "lr": 3e-3, "num_epochs": 2, "max_eval_step": 1,
            "num_workers_dataloader": 0, "plot_metrics": False, **overrides}


def losses(summary) -> list[float]:
    return [record["loss"] for record in summary["metrics"] if "loss" in record]


def generates(model, processor) -> bool:
    """Whether the model, asked about a red image, generates new tokens greedily."""
    prompt = processor.apply_chat_template(conversation(None), add_generation_prompt=True)
    batch = processor(text=prompt, images=[Image.new("RGB", (48, 24), COLOURS["red"])],
                      add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    return out.shape[1] > batch["input_ids"].shape[1]


def test_llava_labels_skip_the_expanded_image_tokens(family_dir):
    """The processor turns one ``<image>`` into a token per patch; the collator lines its tokens
    up with the chat template's: the image tokens and the user turn learn nothing, the assistant
    turn does."""
    processor = AutoProcessor.from_pretrained(family_dir / "tiny-llava")
    ids, labels, text = turn_tokens(processor.tokenizer, conversation("green"),
                                    processor.apply_chat_template)
    image = {"bytes": b"", "path": str(family_dir / "colours" / "images" / "0.png")}  # as stored
    batch = image_collate(processor)([{"input_ids": ids, "labels": labels, "text": text,
                                       "images": [image]}])
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    is_image = batch["input_ids"][0] == image_token
    assert is_image.sum() > 1 and (batch["labels"][0][is_image] == IGNORE).all()
    learned = batch["labels"][0][batch["labels"][0] != IGNORE]
    assert processor.decode(learned) == processor.apply_chat_template(conversation("green")[1:])


def test_llava_full_fine_tuning_trains_and_loads_with_transformers(family_dir, tmp_path):
    summary = finetuning.main(**llava_settings(family_dir, output_dir=str(tmp_path)))
    curve = losses(summary)
    assert sum(curve[-2:]) < 0.8 * sum(curve[:2]), curve
    saved = tmp_path / "model"
    model = AutoModelForImageTextToText.from_pretrained(saved).eval()
    assert generates(model, AutoProcessor.from_pretrained(saved))


def test_llava_lora_adapts_the_language_model_and_loads_with_peft(family_dir, tmp_path):
    summary = finetuning.main(**llava_settings(family_dir, use_peft=True, lr=1e-2,
                                               output_dir=str(tmp_path)))
    curve = losses(summary)
    assert sum(curve[-2:]) < sum(curve[:2]), curve
    adapted = [n for n, p in summary["model"].named_parameters() if p.requires_grad]
    assert adapted and all(".language_model." in n and "lora_" in n for n in adapted)
    base = load_base_model(str(family_dir / "tiny-llava"), torch.float32,
                           adapter_dir=str(tmp_path))
    model = PeftModel.from_pretrained(base, tmp_path).eval()
    assert generates(model, AutoProcessor.from_pretrained(tmp_path))


def test_llava_freeze_llm_only_trains_the_image_side(family_dir, tmp_path):
    """LLaVA has no cross-attention layers: the image encoder and projector train, the whole
    language model (embedding and output layer too) is frozen."""
    summary = finetuning.main(**llava_settings(family_dir, freeze_LLM_only=True, num_epochs=1,
                                               max_train_step=2, save_model=False,
                                               output_dir=str(tmp_path)))
    for name, param in summary["model"].named_parameters():
        image_side = name.startswith(("model.vision_tower.", "model.multi_modal_projector."))
        assert param.requires_grad == image_side, name


def test_planner_refuses_a_family_it_does_not_model(family_dir):
    with pytest.raises(ConfigError, match="llava's config has no vision_config.vision_output_dim"
                                          ".*--dry_run and --auto_fit cannot plan it"):
        plan.main(**llava_settings(family_dir), world_size=1, gpu_memory="80GiB")


def test_gpu_defaults_leave_an_unplanned_family_its_own_setting(family_dir, capsys):
    """On a GPU the defaults would plan the micro-batch and checkpointing: for a family the
    planner does not model, the run keeps its own and says why (it still starts)."""
    settings = llava_settings(family_dir)
    settings.pop("batch_size_training")  # nothing pinned: the defaults would choose
    run = build_run_config(**settings, gpu_memory="80GiB")
    kept = apply_gpu_defaults(run, 1, cuda=True, verbose=True)
    assert (kept.train.batch_size_training, kept.fsdp.fsdp_activation_checkpointing) == (
        run.train.batch_size_training, run.fsdp.fsdp_activation_checkpointing)
    printed = capsys.readouterr().out
    assert "the run's own micro-batch and checkpointing (not planned: " in printed
    assert "llava's config has no" in printed


def test_qwen2_vl_layers_are_found_and_its_inputs_reach_the_model(family_dir):
    """Qwen2-VL keeps its image encoder as ``visual``: its blocks are found apart from the text
    decoder's layers, and the batch field its processor adds for multimodal positions
    (``mm_token_type_ids``) is passed to the model, which needs it with images."""
    run = build_run_config(model_name=str(family_dir / "tiny-qwen2-vl"))
    model = load_model(run.train, torch.float32, on_meta=False)
    assert len(text_layers(model)) == model.config.text_config.num_hidden_layers
    assert len(image_encoder_layers(model)) == model.config.vision_config.depth
    config, image = model.config, model.config.image_token_id
    ids = torch.tensor([[0, 5, config.vision_start_token_id, *[image] * 4,
                         config.vision_end_token_id, 7, 1]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(16, 3 * 2 * 8 * 8),  # a 4 x 4 grid of 8-pixel patches
             "image_grid_thw": torch.tensor([[1, 4, 4]]),
             "mm_token_type_ids": (ids == image).long()}
    model(**model_inputs(model, batch), labels=ids).loss.backward()
    assert model.model.visual.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


@pytest.mark.skipif(is_torchvision_available(), reason="the refusal is for a missing torchvision")
def test_qwen2_vl_processor_without_torchvision_is_refused_naming_it(family_dir, tmp_path):
    settings = llava_settings(family_dir, model_name=str(family_dir / "tiny-qwen2-vl"),
                              output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="Qwen2VLProcessor has a video processor.*"
                                          "torchvision is not installed"):
        finetuning.main(**settings)
