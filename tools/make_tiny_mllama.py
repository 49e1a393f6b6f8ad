"""Regenerate ``llm_finetune/assets/tiny-mllama``: a Llama 3.2 Vision (mllama) shape small enough
to train a step on CPU in well under a second, with tiny-llama's tokenizer and a processor.

Like tiny-llama it ships no weights: a run initialises it from its seed. The tokenizer is
tiny-llama's plus the ``<|image|>`` token, whose id is the text vocabulary's size (as in the real
model: the embedding has 8 rows more than the output layer, so image tokens are never predicted).
Images are tiled into 32-pixel tiles, at most 2 per image. Run ``python tools/make_tiny_mllama.py``
after ``tools/make_tiny_assets.py``; the output is deterministic.
"""

from pathlib import Path

from transformers import (AutoTokenizer, MllamaConfig, MllamaImageProcessorPil, MllamaProcessor)

from make_tiny_vlms import save_config  # this folder's script: the same tokenizer clean-up

ASSETS = Path(__file__).resolve().parent.parent / "llm_finetune" / "assets"
IMAGE_TOKEN = "<|image|>"
TILE = 32  # pixels per tile side
# one turn per message, as tiny-llama's template; content is text, or a list of image and text
# parts (the form vision processors take), an image part standing for the image token
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<s>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '" + IMAGE_TOKEN
    + "' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(ASSETS / "tiny-llama")
    text_vocab = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_token_id == text_vocab, image_token_id
    tokenizer.chat_template = CHAT_TEMPLATE
    images = MllamaImageProcessorPil(size={"height": TILE, "width": TILE}, max_image_tiles=2)
    processor = MllamaProcessor(images, tokenizer, chat_template=CHAT_TEMPLATE)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  intermediate_size=64, intermediate_layers_indices=[0], vision_output_dim=64,
                  image_size=TILE, patch_size=8, max_num_tiles=2,
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    text = dict(vocab_size=text_vocab, hidden_size=128, intermediate_size=256,
                num_hidden_layers=4, cross_attention_layers=[1, 3], num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id)
    model_dir = ASSETS / "tiny-mllama"
    processor.save_pretrained(model_dir)
    save_config(config, model_dir)
    print(f"tiny-mllama: text vocabulary {text_vocab}, image token {image_token_id}, "
          f"written under {model_dir}")


if __name__ == "__main__":
    main()
