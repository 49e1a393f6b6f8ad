"""Write a config-only model directory of a real model's shape (random init, no download).

    python benchmarks/make_shape_config.py llama3-8b /tmp/llama3-8b
"""

import sys

from transformers import LlamaConfig

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192, rope_theta=500000.0),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                        max_position_embeddings=8192, rope_theta=500000.0,
                        tie_word_embeddings=True),
}

if __name__ == "__main__":
    name, directory = sys.argv[1], sys.argv[2]
    LlamaConfig(**SHAPES[name]).save_pretrained(directory)
    print(f"{name} config written to {directory}")
