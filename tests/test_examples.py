"""The examples run as documented."""

import shutil
import subprocess
import sys

from tests.helpers import REPO


def test_quickstart_runs_and_generates(tmp_path):
    shutil.copytree(REPO / "llm_finetune" / "assets", tmp_path / "llm_finetune" / "assets")
    done = subprocess.run([sys.executable, str(REPO / "examples" / "quickstart.py")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin",
                               "TOKENIZERS_PARALLELISM": "false",
                               "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                               "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "eval loss per epoch" in done.stdout
    assert (tmp_path / "output" / "quickstart" / "lora" / "model" / "adapter_model.safetensors").is_file()
