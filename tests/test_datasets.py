"""file_dataset (instruction and chat rows, four file formats), custom_dataset, bad rows."""

import json

import pytest

from llm_finetune import finetuning
from llm_finetune.config_utils import ConfigError, build_run_config, validate
from llm_finetune.data.loaders import load_dataset_split
from llm_finetune.data.rows import DataError
from llm_finetune.model import load_tokenizer

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": f"{2 * i + 1}"}
        for i in range(40)]
CHATS = [{"messages": [{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": f"What is {i} + {i}?"},
                       {"role": "assistant", "content": f"{2 * i}"}]} for i in range(40)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def split(tmp_path, name="train", **settings):
    run = build_run_config(dataset="file_dataset", **{f"file_dataset.{k}": v
                                                      for k, v in settings.items()})
    return load_dataset_split(run, load_tokenizer(run.train), name)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_instruction_rows_in_every_format(suffix, tmp_path):
    import datasets

    path = tmp_path / f"data{suffix}"
    table = datasets.Dataset.from_list(ROWS)
    {".jsonl": lambda: table.to_json(path), ".json": lambda: path.write_text(json.dumps(ROWS)),
     ".csv": lambda: table.to_csv(path), ".parquet": lambda: table.to_parquet(path)}[suffix]()
    train = split(tmp_path, data_files=str(path), val_split=0.25)
    test = split(tmp_path, "test", data_files=str(path), val_split=0.25)
    assert len(train) == 30 and len(test) == 10
    sample = train[0]
    first_learned = next(i for i, label in enumerate(sample["labels"]) if label != -100)
    assert sample["labels"][first_learned:] == sample["input_ids"][first_learned:]
    assert first_learned > 10  # the prompt is masked


def test_chat_rows_learn_only_assistant_turns(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    sample = split(tmp_path, data_files=str(path), val_split=0.1)[0]
    tokenizer = load_tokenizer(build_run_config().train)
    learned = tokenizer.decode([t for t, l in zip(sample["input_ids"], sample["labels"]) if l != -100])
    whole = tokenizer.decode(sample["input_ids"])
    assert "Be brief." in whole and "What is" in whole
    assert "What is" not in learned and "Be brief" not in learned
    assert learned.startswith("<s>assistant\n") and learned.rstrip().endswith("</s>")


def test_bad_rows_fail_with_the_row_or_are_skipped(tmp_path):
    rows = ROWS[:10] + [{"instruction": "x", "output": ""}] + ROWS[10:20] + [{"instruction": "y"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"2 of 22 rows cannot be used; first at \S*bad.jsonl line 11: "
                                        r"field 'output' is empty"):
        build = build_run_config(dataset="file_dataset", **{"file_dataset.data_files": str(path),
                                                            "file_dataset.eval_files": str(path)})
        load_dataset_split(build, load_tokenizer(build.train), "train")
    run = build_run_config(dataset="file_dataset", bad_rows="skip",
                           **{"file_dataset.data_files": str(path), "file_dataset.eval_files": str(path)})
    assert len(load_dataset_split(run, load_tokenizer(run.train), "train")) == 20


@pytest.mark.parametrize("files,expected", [
    ("nope.jsonl", "no such file"), ("data.txt", "unknown format"), ("a.jsonl,b.csv", "mixes formats")])
def test_file_errors(files, expected, tmp_path):
    for name in ("data.txt", "a.jsonl", "b.csv"):
        (tmp_path / name).write_text("{}\n")
    with pytest.raises(DataError, match=expected):
        split(tmp_path, data_files=",".join(str(tmp_path / f) for f in files.split(",")))


def test_file_dataset_needs_files():
    with pytest.raises(ConfigError, match="needs --file_dataset.data_files"):
        validate(build_run_config(dataset="file_dataset"), world_size=1, cuda=False)


CUSTOM = '''
def get_custom_dataset(config, tokenizer, split):
    ids = tokenizer.encode("hello world " * 3)
    return [{"input_ids": ids, "labels": ids} for _ in range(24)]

def wrong_rows(config, tokenizer, split):
    return [{"text": "hi"}]
'''


def test_custom_dataset_success_and_errors(tmp_path):
    module = tmp_path / "my_data.py"
    module.write_text(CUSTOM)

    def load(spec):
        run = build_run_config(dataset="custom_dataset", **{"custom_dataset.file": spec})
        return load_dataset_split(run, load_tokenizer(run.train), "train")

    assert len(load(str(module))) == 24
    with pytest.raises(DataError, match="has no function 'missing'"):
        load(f"{module}:missing")
    with pytest.raises(DataError, match="without \\['input_ids', 'labels'\\]"):
        load(f"{module}:wrong_rows")
    with pytest.raises(DataError, match="is not a Python file"):
        load(str(tmp_path / "absent.py"))


def test_training_on_a_chat_file(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS * 3)
    summary = finetuning.main(dataset="file_dataset", output_dir=str(tmp_path / "out"),
                              max_train_step=6, num_workers_dataloader=0, save_model=False,
                              val_batch_size=2,
                              **{"file_dataset.data_files": str(path)})
    assert len([m for m in summary["metrics"] if "loss" in m]) == 6
    assert summary["eval_loss"][-1] < summary["metrics"][0]["loss"]


def test_samsum_and_grammar_from_local_files(tmp_path):
    dialogs = [{"id": str(i), "dialogue": f"Ann: hi {i}\nBob: hello", "summary": f"They greet {i}."}
               for i in range(12)]
    samsum = write_jsonl(tmp_path / "samsum.jsonl", dialogs)
    run = build_run_config(dataset="samsum_dataset", **{"samsum_dataset.train_file": str(samsum)})
    tokenizer = load_tokenizer(run.train)
    sample = load_dataset_split(run, tokenizer, "train")[0]
    first = next(i for i, label in enumerate(sample["labels"]) if label != -100)
    assert tokenizer.decode(sample["input_ids"][1:first]) == \
        "Summarize this dialog:\nAnn: hi 0\nBob: hello\n---\nSummary:\n"
    assert tokenizer.decode(sample["labels"][first:-1]) == "They greet 0."

    grammar = tmp_path / "grammar.csv"
    grammar.write_text("input,target\n" + "".join(f"he go {i},he goes {i}\n" for i in range(10)))
    run = build_run_config(dataset="grammar_dataset", **{"grammar_dataset.train_file": str(grammar)})
    sample = load_dataset_split(run, tokenizer, "train")[3]
    assert tokenizer.decode(sample["input_ids"][1:]).startswith(
        "Correct this to standard English: he go 3\n---\nCorrected: he goes 3")


def test_hub_data_set_offline_says_what_to_do(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    run = build_run_config(dataset="samsum_dataset")
    with pytest.raises(DataError, match="--samsum_dataset.train_file and --samsum_dataset.eval_file"):
        load_dataset_split(run, load_tokenizer(run.train), "train")


def test_llamaguard_toxicchat_learns_only_the_verdict(tmp_path):
    """toxic-chat rows in Llama Guard's prompt: the label is safe / unsafe + the top moderation
    category as a Llama Guard code; the prompt has no loss; a malformed row is named."""
    rows = [{"user_input": "How do I bake bread?", "toxicity": 0, "openai_moderation": "[]"},
            {"user_input": "I hate them all", "toxicity": 1,
             "openai_moderation": "[['sexual', 0.01], ['harassment', 0.8], ['hate', 0.4]]"},
            {"user_input": "something", "toxicity": 1, "openai_moderation": "[]"}] * 4
    path = write_jsonl(tmp_path / "toxic.jsonl", rows)
    run = build_run_config(dataset="llamaguard_toxicchat_dataset", tokenize_num_proc=2,
                           context_length=1024,
                           **{"llamaguard_toxicchat_dataset.train_file": str(path)})
    tokenizer = load_tokenizer(run.train)
    samples = load_dataset_split(run, tokenizer, "train")
    verdicts = []
    for sample in samples.select(range(3)):
        first = next(i for i, label in enumerate(sample["labels"]) if label != -100)
        prompt = tokenizer.decode(sample["input_ids"][1:first])
        assert "S10: Hate." in prompt and prompt.rstrip().endswith("violated categories.")
        verdicts.append(tokenizer.decode(sample["labels"][first:-1]))
    assert verdicts == ["safe", "unsafe\nS10", "unsafe"]
    assert "User: I hate them all" in tokenizer.decode(samples[1]["input_ids"])

    bad = write_jsonl(tmp_path / "bad.jsonl", rows[:2] + [{"user_input": "x", "toxicity": 7,
                                                         "openai_moderation": "[]"}])
    run = build_run_config(dataset="llamaguard_toxicchat_dataset",
                           **{"llamaguard_toxicchat_dataset.train_file": str(bad)})
    with pytest.raises(DataError, match="bad.jsonl line 3: field 'toxicity' is 7"):
        load_dataset_split(run, tokenizer, "train")


def test_tokenize_num_proc_reaches_datasets_map(tmp_path, monkeypatch):
    import datasets

    seen, real_map = [], datasets.Dataset.map

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("num_proc"))
        return real_map(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", spy)
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    split(tmp_path, data_files=str(path))
    assert seen == [None]  # the default: one process
    run = build_run_config(dataset="file_dataset", tokenize_num_proc=2,
                           **{"file_dataset.data_files": str(path)})
    samples = load_dataset_split(run, load_tokenizer(run.train), "train")
    assert seen[-1] == 2 and len(samples) == 38
