"""One config per data set (llama-recipes names). ``data_path`` always works offline."""

from dataclasses import dataclass
from pathlib import Path

_ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass
class alpaca_dataset:
    dataset: str = "alpaca_dataset"
    train_split: str = "train"
    test_split: str = "val"
    # A JSON list of {"instruction", "input", "output"} records; the first `eval_size` rows form
    # the eval split, as in llama-recipes. The default is the shipped synthetic set.
    data_path: str = str(_ASSETS / "data" / "tiny_alpaca.json")
    eval_size: int = 200
