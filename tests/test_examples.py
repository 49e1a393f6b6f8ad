"""The examples run as documented: the quickstart notebook top to bottom, the custom data
function and the chat data file."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from llm_finetune import finetuning
from tests.helpers import FAST, REPO


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    notebook = nbformat.read(REPO / "examples" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for o in cell.outputs)
    assert "memory plan: llama3-8b" in outputs and "Changes that would fit" in outputs
    assert "eval loss per epoch" in outputs
    assert any(o.get("data", {}).get("image/png") for cell in notebook.cells
               if cell.cell_type == "code" for o in cell.outputs), "no plot shown"
    assert (tmp_path / "output/notebook/lora/adapter_model.safetensors").is_file()


@pytest.mark.parametrize("data", [
    {"dataset": "custom_dataset",
     "custom_dataset.file": str(REPO / "examples/custom_dataset.py") + ":get_custom_dataset"},
    {"dataset": "file_dataset", "file_dataset.data_files": str(REPO / "examples/data/chat.jsonl")},
])
def test_example_data_trains(data, tmp_path):
    summary = finetuning.main(**{**FAST, "max_train_step": 8, "lr": 3e-3, **data},
                              output_dir=str(tmp_path))
    losses = [m["loss"] for m in summary["metrics"] if "loss" in m]
    assert losses[-1] < losses[0]
