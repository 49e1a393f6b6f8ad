import os
import shutil

import pytest

from tests.helpers import save_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-weights"))


@pytest.fixture(scope="session")
def tied_model_dir(tmp_path_factory):
    """Input embedding and lm_head share one tensor (Llama-3.2-1B, small Qwen models)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama-tied"), tie_embeddings=True)


@pytest.fixture(scope="session")
def tied_config_dir(tmp_path_factory, tied_model_dir):
    """Only the tied model's config.json: a model that exists as a config (random init)."""
    directory = tmp_path_factory.mktemp("tiny-llama-tied-config")
    shutil.copy(tied_model_dir / "config.json", directory / "config.json")
    return directory
