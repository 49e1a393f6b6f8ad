"""Bad input and faults (issue #15): each gets one line on stderr naming what, where and the fix,
and exit status 2, before the model loads; outputs of earlier runs are not replaced unasked."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from llm_finetune import finetuning
from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.preflight import validate
from tests.helpers import FAST, REPO

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"}
        for i in range(40)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """The model must not load: every case here is refused before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    monkeypatch.setattr(finetuning, "load_model", refuse)


def cli_error(capsys, **settings) -> str:
    """Run the command-line entry in this process; return its one-line error."""
    with pytest.raises(SystemExit) as stopped:
        finetuning.cli(**settings)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def file_run(tmp_path, path, **extra) -> dict:
    return dict(FAST, dataset="file_dataset", output_dir=str(tmp_path / "out"),
                **{"file_dataset.data_files": str(path)}, **extra)


# 1. truncation that leaves nothing to learn

def test_context_length_that_cuts_every_response_is_an_error(tmp_path, capsys, no_model_load):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    line = cli_error(capsys, **file_run(tmp_path, path, context_length=16))
    assert "none of the" in line and "Raise --context_length" in line
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_samples_that_lose_all_labels_are_counted(capsys):
    import datasets

    from llm_finetune.data.rows import check_labels

    samples = datasets.Dataset.from_list([{"labels": [-100, -100, 5, 6]}] * 3
                                         + [{"labels": [-100] * 4}] * 2)
    check_labels(samples, "file_dataset train", 4)
    assert "warning: file_dataset train: 2 of 5 samples have no token to learn within " \
           "--context_length 4" in capsys.readouterr().out


# 2. data files: empty, broken line, wrong columns, missing; output_dir not writable

@pytest.mark.parametrize("content,expected", [
    ("", r"rows\.jsonl is empty: it holds no rows"),
    (json.dumps(ROWS[0]) + '\n{"instruction": "a", "output" "b"}\n',
     r"rows\.jsonl line 2: not valid JSON \(Expecting ':' delimiter"),
    (json.dumps({"question": "a", "answer": "b"}) + "\n",
     r"no column 'instruction' \(its columns: question, answer\).*"
     r"--file_dataset\.instruction_column"),
])
def test_bad_data_file_is_named_with_its_line(content, expected, tmp_path, capsys, no_model_load):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    assert re.search(expected, cli_error(capsys, **file_run(tmp_path, path)))


def test_missing_data_file_and_unwritable_output_dir(tmp_path, capsys, no_model_load):
    line = cli_error(capsys, **file_run(tmp_path, tmp_path / "absent.jsonl"))
    assert "--file_dataset.data_files: " in line and "absent.jsonl: no such file" in line
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = cli_error(capsys, **dict(FAST, output_dir=str(blocker / "out")))
    assert "is not writable" in line and "is a file" in line


def test_bad_row_after_the_split_is_named_by_file_and_line(tmp_path):
    from llm_finetune.data.loaders import load_dataset_split
    from llm_finetune.data.rows import DataError
    from llm_finetune.model import load_tokenizer

    path = write_jsonl(tmp_path / "rows.jsonl", ROWS[:30] + [{"instruction": "x"}] + ROWS[30:])
    run = build_run_config(dataset="file_dataset", **{"file_dataset.data_files": str(path),
                                                      "file_dataset.val_split": 0.5})
    with pytest.raises(DataError, match=r"rows\.jsonl line 31: missing field 'output'"):
        for split in ("train", "test"):  # the bad row is in one of them
            load_dataset_split(run, load_tokenizer(run.train), split)


# 3. a hub name that does not exist

def test_unknown_hub_model_is_one_line(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "llm_finetune.finetuning", "--model_name",
                           "no-such-org/no-such-model", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert "--model_name no-such-org/no-such-model is neither a local directory nor a model on " \
           "the Hugging Face hub that could be reached" in lines[0]
    assert "tiny-llama" in lines[0] and "llama3-8b" in lines[0]  # the names that need no hub


# 4. --help

def test_help_prints_usage_and_exits_0(capsys):
    finetuning.cli(h=True)
    assert capsys.readouterr().out.startswith("usage: python -m llm_finetune.finetuning")
    done = subprocess.run([sys.executable, "-m", "llm_finetune.finetuning", "--help"],
                          capture_output=True, text=True, cwd=REPO, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0 and not done.stderr
    assert "usage:" in done.stdout and "--lora_config.r=8" in done.stdout


# 5. the preset's data file

def test_preset_without_alpaca_data_says_where_to_get_it(tmp_path, monkeypatch):
    run = build_run_config(config=str(REPO / "configs" / "llama3_8b_full_fsdp.yaml"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as error:
        validate(run, world_size=8, cuda=True)
    assert "github" in str(error.value) and "stanford_alpaca" in str(error.value)
    assert "point --alpaca_dataset.data_path at the file" in str(error.value)


# 6. LoRA on the random-init built-in model: inference and merging rebuild its base

def test_lora_on_a_random_init_base_loads_for_inference_and_merge(tmp_path):
    from llm_finetune.convert import merge_adapters
    from llm_finetune.inference import load

    summary = finetuning.main(**{**FAST, "save_model": True}, use_peft=True,
                              output_dir=str(tmp_path / "lora"))
    adapter = str(tmp_path / "lora")
    trained = summary["model"].eval()
    ids = torch.randint(3, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        loaded, _ = load("tiny-llama", adapter)
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
        merged = merge_adapters("tiny-llama", adapter, str(tmp_path / "merged"), dtype="float32")
        merged_model, _ = load(merged)
        torch.testing.assert_close(merged_model(input_ids=ids).logits, expected,
                                   rtol=1e-4, atol=1e-4)
    done = subprocess.run([sys.executable, "-m", "llm_finetune.inference", "--model_name",
                           "tiny-llama", "--peft_model", adapter, "--prompt", "What is 1 + 1?",
                           "--max_new_tokens", "4"], capture_output=True, text=True, cwd=REPO,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 0, done.stderr[-3000:]


# 7. progress off a terminal

def test_progress_is_plain_lines_off_a_terminal(tmp_path, capsys):
    finetuning.main(**FAST, output_dir=str(tmp_path))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "epoch 1/1: step 1/4 loss=" in err and "epoch 1/1: step 4/4 loss=" in err


# 8. a previous run's output_dir

def test_a_finished_runs_output_dir_is_not_replaced_unasked(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    finetuning.main(**{**FAST, "save_model": True, "max_train_step": 1}, output_dir=str(out))
    record = (out / "run_config.json").read_text()
    capsys.readouterr()
    real_load = finetuning.load_model
    monkeypatch.setattr(finetuning, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    line = cli_error(capsys, **FAST, output_dir=str(out))
    assert "holds a previous run (run_config.json, metrics.jsonl, model)" in line
    assert "--resume_from_checkpoint auto" in line and "--overwrite_output_dir True" in line
    assert (out / "run_config.json").read_text() == record
    monkeypatch.setattr(finetuning, "load_model", real_load)
    finetuning.main(**{**FAST, "max_train_step": 1}, output_dir=str(out),
                    overwrite_output_dir=True)
    assert not (out / "model").exists()  # the old run's model is gone, not left beside the new
    assert json.loads((out / "run_config.json").read_text())["train_config"]["overwrite_output_dir"]


# 9. packing masks every sample boundary

def test_packing_never_predicts_the_next_samples_first_token():
    from llm_finetune.data.batching import pack_samples

    samples = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]},
               {"input_ids": [8, 9], "labels": [8, 9]}]
    (block,) = pack_samples(samples, context_length=8, pad_token_id=0)
    starts = [i for i, p in enumerate(block["position_ids"][:block["num_tokens"]]) if p == 0]
    assert starts == [0, 3]
    assert [block["labels"][i] for i in starts] == [-100, -100]
    assert block["labels"][:5] == [-100, 6, 7, -100, 9]


# 10. prefix tuning with packing

def test_prefix_tuning_with_packing_is_refused():
    run = build_run_config(use_peft=True, peft_method="prefix", batching_strategy="packing",
                           **{"fsdp_config.fsdp_activation_checkpointing": False})
    with pytest.raises(ConfigError, match="attend to each other.*--batching_strategy padding"):
        validate(run, world_size=1, cuda=False)


# 11. trackers on resume

def test_resumed_run_continues_tensorboard_and_wandb(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_observability import FakeWandb

    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    settings = dict(FAST, output_dir=str(tmp_path), use_tensorboard=True, use_wandb=True,
                    run_validation=False)
    first = finetuning.main(**settings, save_steps=2)
    assert "id" not in wandb.init_kwargs
    resumed = finetuning.main(**settings,
                              resume_from_checkpoint=str(tmp_path / "checkpoints" / "step-00000002"))
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [1, 2, 3, 4]  # the checkpoint's own step kept
    losses = [m["loss"] for m in first["metrics"][:2] + resumed["metrics"] if "loss" in m]
    assert [e.value for e in scalars] == pytest.approx(losses, rel=1e-6)
    assert wandb.init_kwargs["id"] == wandb.id and wandb.init_kwargs["resume"] == "allow"


# 12. the collective timeout

def test_distributed_timeout_reaches_init_process_group(monkeypatch, tmp_path):
    import datetime

    import torch.distributed as dist

    seen = {}

    class Stop(Exception):
        pass

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(dist, "init_process_group", record)
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.setenv(name, "")  # restored after the test: setup() sets them
        monkeypatch.delenv(name)
    with pytest.raises(Stop):
        finetuning.main(**FAST, enable_fsdp=True, distributed_timeout_minutes=90,
                        output_dir=str(tmp_path))
    assert seen["timeout"] == datetime.timedelta(minutes=90)
    assert build_run_config().train.distributed_timeout_minutes == 60
