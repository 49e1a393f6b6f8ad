"""Write tiny random-init LLaVA and Qwen2-VL models (config and processor, no weights) that
train in seconds on CPU, for trying other vision families than mllama:

    python tools/make_tiny_vlms.py OUT_DIR

writes OUT_DIR/tiny-llava and OUT_DIR/tiny-qwen2-vl, each a directory ``--model_name`` takes
(a run initialises it from its seed, as tiny-mllama). Both use tiny-llama's tokenizer plus the
family's image tokens (ids past tiny-llama's vocabulary, which the text config's vocabulary
covers) and a chat template that renders ``{"type": "image"}`` parts as the family's real one
does: LLaVA's ``<image>``, which its processor expands into one token per image patch, and
Qwen2-VL's ``<|vision_start|><|image_pad|><|vision_end|>``, whose ``<|image_pad|>`` its
processor expands into one token per 2 x 2 merged patches. tests/test_vision_families.py uses
the same functions.

Qwen2-VL's processor takes a video processor too, which transformers builds with torchvision
only: without torchvision its parts (tokenizer, chat template, image processor) are written as
its processor would write them, and loading it is refused naming torchvision (docs/vision.md).
"""

import json
import sys
from pathlib import Path

import transformers
from transformers import (AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig,
                          LlavaProcessor, Qwen2VLConfig, Qwen2VLImageProcessorPil)
from transformers.utils import is_torchvision_available

TINY_LLAMA = Path(__file__).resolve().parent.parent / "llm_finetune" / "assets" / "tiny-llama"
PIXELS = 32  # LLaVA's image side; Qwen2-VL's images are resized to between 32 and 64 pixels
TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def chat_template(image: str) -> str:
    """tiny-llama's turns (``<s>role\\n ... </s>``), an image part rendered as ``image``."""
    return (
        "{% for message in messages %}{{ '<s>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '" + image
        + "' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
        "{% endif %}{{ '</s>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}")


def tokenizer_with(tokens: list[str], template: str):
    """tiny-llama's tokenizer plus ``tokens`` (special, ids from 1024 on)."""
    tokenizer = AutoTokenizer.from_pretrained(TINY_LLAMA)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.chat_template = template
    return tokenizer


def text_config(tokenizer) -> dict:
    return dict(TEXT, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def save(processor, config, directory: Path) -> Path:
    """The processor and config, without the loading-time keys save_pretrained records."""
    processor.save_pretrained(directory)
    return save_config(config, directory)


def save_parts(images, tokenizer, name: str, config, directory: Path) -> Path:
    """What ``name``'s ``save_pretrained`` writes for its tokenizer and image processor, for a
    processor that cannot be built here (Qwen2-VL's without torchvision)."""
    tokenizer.save_pretrained(directory)
    (directory / "chat_template.jinja").write_text(tokenizer.chat_template)
    fields = {"image_processor": images.to_dict(), "processor_class": name}
    (directory / "processor_config.json").write_text(json.dumps(fields, indent=2) + "\n")
    return save_config(config, directory)


def save_config(config, directory: Path) -> Path:
    config.save_pretrained(directory)
    tokenizer_config = directory / "tokenizer_config.json"
    fields = json.loads(tokenizer_config.read_text())
    for key in ("is_local", "local_files_only"):
        fields.pop(key, None)
    tokenizer_config.write_text(json.dumps(fields, indent=2) + "\n")
    return directory


def tiny_llava(directory: Path) -> Path:
    """LLaVA: a 2-layer CLIP encoder on 32-pixel images of 8-pixel patches (16 image tokens, the
    class token dropped) and a 2-layer Llama decoder."""
    image = "<image>"
    tokenizer = tokenizer_with([image], chat_template(image))
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=PIXELS, patch_size=8)
    text = dict(text_config(tokenizer), model_type="llama", head_dim=32,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(image),
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    images = CLIPImageProcessorPil(size={"shortest_edge": PIXELS},
                                   crop_size={"height": PIXELS, "width": PIXELS})
    processor = LlavaProcessor(images, tokenizer, patch_size=8, chat_template=chat_template(image),
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1)
    return save(processor, config, directory)


def tiny_qwen2_vl(directory: Path) -> Path:
    """Qwen2-VL: a 2-layer encoder of 8-pixel patches merged 2 x 2 (a 32-pixel image is 4 image
    tokens) and a 2-layer Qwen2 decoder with multimodal rotary positions."""
    start, pad, end, video = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                              "<|video_pad|>")
    template = chat_template(start + pad + end)
    tokenizer = tokenizer_with([start, pad, end, video], template)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           [("vision_start", start), ("image", pad), ("vision_end", end), ("video", video)]}
    vision = dict(depth=2, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2,
                  mlp_ratio=2, patch_size=8, spatial_merge_size=2, temporal_patch_size=2)
    text = dict(text_config(tokenizer), rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    config = Qwen2VLConfig(vision_config=vision, text_config=text,
                           image_token_id=ids["image"], video_token_id=ids["video"],
                           vision_start_token_id=ids["vision_start"],
                           vision_end_token_id=ids["vision_end"])
    images = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                      min_pixels=PIXELS * PIXELS, max_pixels=4 * PIXELS * PIXELS)
    if not is_torchvision_available():
        return save_parts(images, tokenizer, "Qwen2VLProcessor", config, directory)
    video = transformers.Qwen2VLVideoProcessor(patch_size=8, merge_size=2, temporal_patch_size=2)
    processor = transformers.Qwen2VLProcessor(images, tokenizer, video, chat_template=template)
    return save(processor, config, directory)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for name, write in [("tiny-llava", tiny_llava), ("tiny-qwen2-vl", tiny_qwen2_vl)]:
        print(f"wrote {write(out / name)}")
