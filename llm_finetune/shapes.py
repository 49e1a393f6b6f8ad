"""Built-in model shapes: configs of well-known models, for random-init runs with no download
(``--model_name llama3-8b``). Users dry-run a cluster with them before fetching 16-140 GB of
weights; benchmarks use them because speed and memory depend on the shape, not the values."""

from transformers import LlamaConfig, Qwen2Config

LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
              num_attention_heads=32, num_key_value_heads=8)
LLAMA32_1B = dict(LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16)
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
    "qwen2.5-7b": lambda: Qwen2Config(vocab_size=152064, hidden_size=3584,
                                      intermediate_size=18944, num_hidden_layers=28,
                                      num_attention_heads=28, num_key_value_heads=4,
                                      max_position_embeddings=32768, rope_theta=1000000.0,
                                      tie_word_embeddings=False),
}
