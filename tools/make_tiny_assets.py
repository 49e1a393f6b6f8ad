"""Regenerate the embedded default: a small instruction data set, a tokenizer trained on it and a
tiny Llama config, all under ``llm_finetune/assets``.

The project must fine-tune something real on a fresh machine with no network, so it ships its own
data and tokenizer instead of downloading them. The data are synthetic tasks (arithmetic, sorting,
word order, capitals, ...) that a few-million-parameter model learns within a minute on CPU, so
a falling eval loss is a real signal. Run ``python tools/make_tiny_assets.py`` to rebuild; the
output is deterministic.
"""

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parent.parent / "llm_finetune" / "assets"
WORDS = (
    "apple river stone cloud green quiet morning window garden silver paper bread music "
    "yellow winter summer mountain ocean forest candle bridge market doctor letter orange "
    "purple rabbit tiger planet rocket coffee island valley pencil castle dragon engine"
).split()
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens",
    "Portugal": "Lisbon", "Austria": "Vienna", "Ireland": "Dublin", "India": "New Delhi",
    "China": "Beijing", "Brazil": "Brasilia", "Mexico": "Mexico City", "Cuba": "Havana",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Turkey": "Ankara", "Iran": "Tehran",
    "Vietnam": "Hanoi", "Thailand": "Bangkok", "Australia": "Canberra", "Argentina": "Buenos Aires",
}


def make_example(rng: random.Random) -> dict:
    task = rng.randrange(7)
    if task == 0:
        a, b = rng.randrange(100), rng.randrange(100)
        return {"instruction": f"What is {a} + {b}?", "input": "", "output": f"{a} + {b} = {a + b}."}
    if task == 1:
        words = rng.sample(WORDS, rng.randint(3, 6))
        return {"instruction": "Reverse the order of the words in the input.",
                "input": " ".join(words), "output": " ".join(reversed(words))}
    if task == 2:
        words = rng.sample(WORDS, rng.randint(2, 4))
        return {"instruction": f"Write this in capital letters: {' '.join(words)}", "input": "",
                "output": " ".join(words).upper()}
    if task == 3:
        country = rng.choice(sorted(CAPITALS))
        return {"instruction": f"What is the capital of {country}?", "input": "",
                "output": f"The capital of {country} is {CAPITALS[country]}."}
    if task == 4:
        numbers = [rng.randrange(50) for _ in range(rng.randint(3, 6))]
        return {"instruction": "Sort these numbers from smallest to largest.",
                "input": ", ".join(map(str, numbers)),
                "output": ", ".join(map(str, sorted(numbers)))}
    if task == 5:
        words = rng.sample(WORDS, rng.randint(2, 8))
        return {"instruction": "How many words are in the input?", "input": " ".join(words),
                "output": f"There are {len(words)} words."}
    word = rng.choice(WORDS)
    return {"instruction": f"Spell the word {word} letter by letter.", "input": "",
            "output": "-".join(word)}


def main() -> None:
    rng = random.Random(0)
    rows = [make_example(rng) for _ in range(3000)]
    data_file = ASSETS / "data" / "tiny_alpaca.json"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    data_file.write_text(json.dumps(rows, indent=0) + "\n")

    special = ["<s>", "</s>", "<pad>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    prompt_text = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request. Instruction Input Response user "
                   "assistant system")
    corpus = [prompt_text] + [" ".join(r.values()) for r in rows]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (
        "{% for message in messages %}{{ '<s>' + message['role'] + '\\n' + message['content'] + "
        "'</s>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
    )
    model_dir = ASSETS / "tiny-llama"
    fast.save_pretrained(model_dir)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id, tie_word_embeddings=False,
    )
    config.save_pretrained(model_dir)
    print(f"{len(rows)} rows, vocabulary {len(fast)}, written under {ASSETS}")


if __name__ == "__main__":
    main()
