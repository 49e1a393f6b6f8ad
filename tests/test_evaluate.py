"""``python -m llm_finetune.evaluate``: lm-eval scores the model a run saved (full weights or an
adapter on its base), the scores are those of the model's own loglikelihoods, they land in the
run's metrics.jsonl and plots, and bad requests stop before anything loads.

The task is local (examples/eval_tasks/tiny_mc: the tiny model's instruction types as
multiple choice, no download). lm-eval is optional and heavy (docs/evaluation.md): without it
these tests are skipped, except the one for the message that says how to install it."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_finetune import evaluate, finetuning
from llm_finetune.data.alpaca import format_prompt
from llm_finetune.errors import ConfigError
from llm_finetune.metrics import read_records, read_scores
from tests.helpers import FAST, REPO

TASKS = REPO / "examples" / "eval_tasks"
DOCS = [json.loads(line) for line in (TASKS / "tiny_mc" / "tiny_mc.jsonl").read_text().splitlines()]
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm_eval not installed (optional, heavy): "
                                          'pip install -e ".[eval]"')


@torch.no_grad()
def argmax_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """Multiple choice by hand: the choice with the highest summed log-probability after the
    prompt wins. The prompt's trailing newline is scored with the choice, as lm-eval documents
    (``_encode_pair``: trailing whitespace of the context moves to the continuation)."""
    right = 0
    for doc in docs:
        prompt = format_prompt(doc["instruction"], doc["input"])
        start = len(tokenizer(prompt.rstrip())["input_ids"])
        scores = []
        for choice in doc["choices"]:
            ids = tokenizer(prompt + choice)["input_ids"]
            logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            scores.append(sum(logp[i - 1, ids[i]].item() for i in range(start, len(ids))))
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return right / len(docs)


def acc(record: dict) -> float:
    return record["scores"]["tiny_mc/acc"]


def test_without_lm_eval_the_error_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[eval\]"'):
        evaluate.main(model_name="tiny-llama", tasks="tiny_mc")


@needs_lm_eval
def test_bad_requests_stop_before_loading_with_the_fix(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(evaluate, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ConfigError, match="no such directory"):
        evaluate.main(model_name=str(tmp_path / "nope" / "model"), tasks="tiny_mc")
    with pytest.raises(ConfigError, match="--peft_model .*no adapter_config.json"):
        evaluate.main(model_name=str(tiny_model_dir), peft_model=str(tmp_path), tasks="tiny_mc")
    with pytest.raises(ConfigError, match="has no weights"):
        evaluate.main(model_name="tiny-llama", tasks="tiny_mc")
    with pytest.raises(ConfigError, match=r"unknown lm-eval task tiny_mcq \(close: tiny_mc"):
        evaluate.main(model_name=str(tiny_model_dir), tasks="tiny_mcq", include_path=str(TASKS))


def train_on_the_task(model_dir, out, **settings):
    """A run fine-tuned on the task's own documents (prompt, right answer): a model made to
    prefer the right choices (about 0.7 accuracy after 24 steps, against 0.3 before)."""
    rows = out.parent / "tiny_mc_rows.jsonl"
    rows.write_text("".join(json.dumps({"instruction": d["instruction"], "input": d["input"],
                                        "output": d["choices"][d["answer"]]}) + "\n"
                            for d in DOCS))
    finetuning.main(**{**FAST, "save_model": True, "max_train_step": 24, "lr": 1e-2,
                       "num_epochs": 100, "batch_size_training": 7, "dataset": "file_dataset",
                       "file_dataset.data_files": str(rows), **settings},
                    model_name=str(model_dir), output_dir=str(out))
    return out


@needs_lm_eval
def test_a_model_trained_on_the_task_scores_higher_and_the_scores_join_its_run(
        tiny_model_dir, tmp_path):
    """The command on a full fine-tuning run's output_dir: the accuracy is the hand-computed one
    of the model it saved, well above the random model it started from; both land in its
    metrics.jsonl (the random one at step 0, on the first 10 documents) and plots."""
    run = train_on_the_task(tiny_model_dir, tmp_path / "run", plot_metrics=True)
    done = subprocess.run([sys.executable, "-m", "llm_finetune.evaluate", "--model_name",
                           str(run), "--tasks", "tiny_mc", "--include_path", str(TASKS)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "tiny_mc" in done.stdout and f"scores appended to {run / 'metrics.jsonl'}" in done.stdout
    evaluate.main(model_name=str(tiny_model_dir), tasks="tiny_mc", include_path=str(TASKS),
                  output_dir=str(run), limit=10)

    trained, random_init = read_scores(run)
    evals = [r for r in read_records(run / "metrics.jsonl") if "eval_loss" in r]
    # the model saved is the best epoch's (save_best): its scores sit at that epoch's step
    assert trained["step"] == min(evals, key=lambda r: r["eval_loss"])["step"] > 0
    assert random_init["step"] == 0
    assert trained["samples"] == {"tiny_mc": len(DOCS)}
    assert random_init["samples"] == {"tiny_mc": 10}
    for record in (trained, random_init):
        assert record["tasks"] == ["tiny_mc"] and 0 <= acc(record) <= 1
        assert 0 < record["stderr"]["tiny_mc/acc"] < 1
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    random_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert acc(trained) == argmax_accuracy(AutoModelForCausalLM.from_pretrained(run / "model"),
                                           tokenizer, DOCS)
    assert acc(random_init) == argmax_accuracy(random_model, tokenizer, DOCS[:10])
    assert acc(trained) > argmax_accuracy(random_model, tokenizer, DOCS) + 0.2
    assert (run / "plots" / "scores.png").stat().st_size > 10_000  # redrawn with the scores


@needs_lm_eval
def test_an_adapter_run_is_scored_on_its_base_with_the_adapter(tiny_model_dir, tmp_path):
    """``--model_name`` a PEFT run's output_dir: the base comes from its train_params.yaml and
    the adapter is applied (the accuracy is the adapted model's, well above the base's), and
    the record goes to that run at its step. LoRA reaches the output layer here: on a random
    base, adapters of the attention alone barely move in a few steps."""
    run = train_on_the_task(tiny_model_dir, tmp_path / "lora", use_peft=True,
                            **{"lora_config.target_modules": "q_proj,v_proj,lm_head"})
    record = evaluate.main(model_name=str(run), tasks="tiny_mc", include_path=str(TASKS),
                           limit=14)
    assert (record["model"], record["peft_model"]) == (str(tiny_model_dir), str(run))
    assert record["samples"] == {"tiny_mc": 14} and record["step"] > 0
    assert read_scores(run) == [record]

    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(run)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert acc(record) == argmax_accuracy(adapted, tokenizer, DOCS[:14])
    assert acc(record) > argmax_accuracy(base, tokenizer, DOCS[:14]) + 0.2
