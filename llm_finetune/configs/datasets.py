"""One config per data set (llama-recipes names). ``data_path`` always works offline."""

from dataclasses import dataclass
from pathlib import Path

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
# the synthetic instruction set the built-in tiny model trains on (tools/make_tiny_assets.py)
SHIPPED_ALPACA = str(_ASSETS / "data" / "tiny_alpaca.json")


@dataclass
class alpaca_dataset:
    train_split: str = "train"
    test_split: str = "val"
    # A JSON list of {"instruction", "input", "output"} records; the first 5% of the rows form
    # the eval split, as in llama-recipes. The default is llama-recipes' path to the Stanford
    # Alpaca file (downloaded by the user); the tiny model's recipe uses SHIPPED_ALPACA.
    data_path: str = "src/llama_cookbook/datasets/alpaca_data.json"


@dataclass
class _local_files:
    """Rows from the user's own files (file_dataset, llama_guard_dataset)."""
    # one or more files, comma-separated: .jsonl, .json, .parquet or .csv
    data_files: str = ""
    eval_files: str = ""  # empty: hold out val_split of data_files
    val_split: float = 0.05
    train_split: str = "train"
    test_split: str = "test"


@dataclass
class file_dataset(_local_files):
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
    data_path: str = ""  # for your function to read (dataset_config.data_path), as in llama-recipes


@dataclass
class samsum_dataset:
    """Dialogue summarisation (llama-recipes' default data set)."""
    hub_name: str = "knkarthick/samsum"  # a hub name, or a local directory of its files
    train_file: str = ""  # local files instead of the hub (JSON/JSONL/CSV/Parquet)
    eval_file: str = ""
    train_split: str = "train"
    test_split: str = "validation"
    prompt: str = "Summarize this dialog:\n{dialogue}\n---\nSummary:\n"
    response_column: str = "summary"


@dataclass
class grammar_dataset:
    """Grammar correction: rows of input and target text (llama-recipes' gtrain_10k.csv and
    grammar_validation.csv), or jfleg's rows (a sentence and its corrections), made into one
    row per correction as llama-recipes' notebook does."""
    hub_name: str = "jhu-clsp/jfleg"  # a hub name, or a local directory of its files
    train_file: str = ""  # e.g. gtrain_10k.csv
    eval_file: str = ""  # e.g. grammar_validation.csv
    # jfleg's splits: llama-recipes trains on its validation split and evaluates on its test
    # split. A path to a CSV here (llama-recipes' spelling) reads that file.
    train_split: str = "validation"
    test_split: str = "test"
    prompt: str = "Correct this to standard English: {input}\n---\nCorrected: "
    response_column: str = "target"


@dataclass
class _llama_guard_format:
    """How a Llama Guard example becomes its prompt and verdict (data/llama_guard.py)."""
    # "llama_guard_3" (the model's own layout, with Llama 3's chat markup), or the template text
    # itself with {categories}, {conversation} and optionally {agent_type} ("User" or "Agent")
    prompt_template: str = "llama_guard_3"
    # a built-in list ("llama_guard_3": S1-S14; "llama_guard_3_1b": S1-S13, what Llama Guard 3
    # 1B knows), or a JSON file: a list of {"name", "description"}, coded S1, S2, ... in order
    categories: str = "llama_guard_3"
    include_descriptions: bool = False  # each category's description under its name
    # Augmentation of the train split, seeded by --seed (the eval split stays as given).
    # List the categories in a random order (codes follow the order shown):
    shuffle_categories: bool = False
    # Add a copy of each example without some of the categories it does not violate:
    drop_categories: bool = False
    # Add a safe copy of each unsafe example without the categories it violates (and some
    # others):
    drop_violated_categories: bool = False


@dataclass
class llamaguard_toxicchat_dataset(_llama_guard_format):
    """Safety classification in Llama Guard 3's prompt format (lmsys/toxic-chat: user_input,
    toxicity, openai_moderation): the model learns the verdict, "safe" or "unsafe" and the
    violated category, with no loss on the prompt."""
    hub_name: str = "lmsys/toxic-chat"
    hub_config: str = "toxicchat0124"
    train_file: str = ""  # local files instead of the hub (JSON/JSONL/CSV/Parquet)
    eval_file: str = ""
    train_split: str = "train"
    test_split: str = "test"


@dataclass
class llama_guard_dataset(_llama_guard_format, _local_files):
    """Your own Llama Guard examples, one per row: prompt, optional response, label ("safe" or
    "unsafe"), violated_category_codes (a list, or "S1,S3"), optional explanation
    (llama-recipes' TrainingExample fields)."""
    category_code_prefix: str = "S"
    # "none", or where the explanation's line goes: "before" or "after" the verdict (each row
    # then needs an explanation)
    explanation_position: str = "none"
    # with explanations on, the explanation of drop_violated_categories' safe copies
    safe_explanation: str = ""
