"""One config per data set (llama-recipes names). ``data_path`` always works offline."""

from dataclasses import dataclass
from pathlib import Path

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
# the synthetic instruction set the built-in tiny model trains on (tools/make_tiny_assets.py)
SHIPPED_ALPACA = str(_ASSETS / "data" / "tiny_alpaca.json")


@dataclass
class alpaca_dataset:
    dataset: str = "alpaca_dataset"
    train_split: str = "train"
    test_split: str = "val"
    # A JSON list of {"instruction", "input", "output"} records; the first `eval_size` rows form
    # the eval split (llama-recipes: the first 5%). The default is llama-recipes' path to the
    # Stanford Alpaca file (downloaded by the user); the tiny model's recipe uses SHIPPED_ALPACA.
    data_path: str = "src/llama_cookbook/datasets/alpaca_data.json"
    eval_size: int = 200


@dataclass
class file_dataset:
    # one or more files, comma-separated: .jsonl, .json, .parquet or .csv
    data_files: str = ""
    eval_files: str = ""  # empty: hold out val_split of data_files
    val_split: float = 0.05
    train_split: str = "train"
    test_split: str = "test"
    # instruction rows
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    # chat rows (used when this column exists): a list of {"role", "content"}
    messages_column: str = "messages"


@dataclass
class custom_dataset:
    file: str = ""  # path/to/file.py[:function], function(dataset_config, tokenizer, split)
    train_split: str = "train"
    test_split: str = "validation"


@dataclass
class samsum_dataset:
    """Dialogue summarisation (llama-recipes' default data set)."""
    hub_name: str = "Samsung/samsum"
    train_file: str = ""  # local files instead of the hub (JSON/JSONL/CSV/Parquet)
    eval_file: str = ""
    train_split: str = "train"
    test_split: str = "validation"
    prompt: str = "Summarize this dialog:\n{dialogue}\n---\nSummary:\n"
    response_column: str = "summary"


@dataclass
class grammar_dataset:
    """Grammar correction (llama-recipes' jfleg/C4 200k CSVs: input, target)."""
    hub_name: str = "jhu-clsp/jfleg"
    train_file: str = ""  # e.g. gtrain_10k.csv
    eval_file: str = ""  # e.g. grammar_validation.csv
    train_split: str = "train"
    test_split: str = "validation"
    prompt: str = "Correct this to standard English: {input}\n---\nCorrected: "
    response_column: str = "target"


@dataclass
class llamaguard_toxicchat_dataset:
    """Safety classification in Llama Guard 3's prompt format (lmsys/toxic-chat: user_input,
    toxicity, openai_moderation): the model learns the verdict, "safe" or "unsafe" and the
    violated category, with no loss on the prompt."""
    hub_name: str = "lmsys/toxic-chat"
    hub_config: str = "toxicchat0124"
    train_file: str = ""  # local files instead of the hub (JSON/JSONL/CSV/Parquet)
    eval_file: str = ""
    train_split: str = "train"
    test_split: str = "test"
