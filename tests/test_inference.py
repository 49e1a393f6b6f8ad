"""Inference from a saved run: batched prompts, the training prompt format, adapters."""

import subprocess
import sys

from llm_finetune import finetuning
from llm_finetune.inference import generate, load
from tests.helpers import FAST, REPO


def test_generates_from_a_trained_model_and_an_adapter(tiny_model_dir, tmp_path):
    finetuning.main(**{**FAST, "save_model": True, "max_train_step": 20, "lr": 3e-3},
                    model_name=str(tiny_model_dir), output_dir=str(tmp_path / "full"))
    model, tokenizer = load(str(tmp_path / "full" / "model"))
    answers = generate(model, tokenizer, ["What is 2 + 3?", "What is the capital of Peru?",
                                          "Spell the word tiger letter by letter."],
                       max_new_tokens=16)
    assert len(answers) == 3 and all(answers)
    # left padding in a batch changes nothing: each prompt alone gives the same greedy answer
    alone = [generate(model, tokenizer, [p], max_new_tokens=16)[0]
             for p in ("What is 2 + 3?", "What is the capital of Peru?")]
    assert alone == answers[:2]
    finetuning.main(**{**FAST, "save_model": True}, model_name=str(tiny_model_dir), use_peft=True,
                    output_dir=str(tmp_path / "lora"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 1 + 1?\nWhat is 4 + 4?\n")
    done = subprocess.run([sys.executable, "-m", "llm_finetune.inference", "--model_name",
                           str(tiny_model_dir), "--peft_model", str(tmp_path / "lora"),
                           "--prompt_file", str(prompts), "--max_new_tokens", "8"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("### What is") == 2
