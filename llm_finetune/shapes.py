"""Built-in model shapes: configs of well-known models, for random-init runs with no download
(``--model_name llama3-8b``). Users dry-run a cluster with them before fetching 16-140 GB of
weights; benchmarks use them because speed and memory depend on the shape, not the values."""

from transformers import LlamaConfig, MllamaConfig, Qwen2Config

LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
              num_attention_heads=32, num_key_value_heads=8)
LLAMA32_1B = dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16)
# Llama-3.2-11B-Vision (its config.json): Llama-3.1-8B's decoder with 8 cross-attention layers
# added among its 40 layers, over the image encoder's output (a ViT-H/14 of 32 layers plus 8
# gated global ones, 4 tiles of 560 pixels per image, 5 of its layers' outputs stacked with the
# last: 7680 per patch); the image token is id 128256, past the text vocabulary
LLAMA32_11B_VISION = dict(
    text_config=dict(LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=40,
                     cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
                     max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "rope_theta": 500000.0,
                                   "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                     tie_word_embeddings=False),
    vision_config=dict(num_hidden_layers=32, num_global_layers=8, hidden_size=1280,
                       attention_heads=16, image_size=560, patch_size=14, max_num_tiles=4,
                       intermediate_size=5120, vision_output_dim=7680,
                       intermediate_layers_indices=[3, 7, 15, 23, 30]),
    image_token_index=128256)
SHAPES = {
    "llama3.2-1b": lambda: LlamaConfig(**LLAMA32_1B, tie_word_embeddings=True),
    # Llama Guard 3 1B: Llama-3.2-1B's layers with an output layer of its own (1.50B
    # parameters, not 1.24B). Derived, not read from its gated config.json: its model card
    # gives the pruned mobile version (12 layers, MLP 6400) 1,123M parameters, which adds up
    # only with an untied output layer, and that version's pruning of the output layer to 20
    # tokens presupposes one. The 1B checkpoint itself keeps the full 128k vocabulary.
    "llama-guard3-1b": lambda: LlamaConfig(**LLAMA32_1B, tie_word_embeddings=False),
    "llama3-8b": lambda: LlamaConfig(**LLAMA3, hidden_size=4096, intermediate_size=14336,
                                     num_hidden_layers=32),
    "llama3-70b": lambda: LlamaConfig(**{**LLAMA3, "num_attention_heads": 64},
                                      hidden_size=8192, intermediate_size=28672,
                                      num_hidden_layers=80),
    "llama3.2-11b-vision": lambda: MllamaConfig(**LLAMA32_11B_VISION),
    "qwen2.5-7b": lambda: Qwen2Config(vocab_size=152064, hidden_size=3584,
                                      intermediate_size=18944, num_hidden_layers=28,
                                      num_attention_heads=28, num_key_value_heads=4,
                                      max_position_embeddings=32768, rope_theta=1000000.0,
                                      tie_word_embeddings=False),
}
