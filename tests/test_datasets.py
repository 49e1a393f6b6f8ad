"""file_dataset (instruction and chat rows, four file formats), custom_dataset (with its own
collator), llama-recipes' data sets from local stand-ins for the hub, bad rows."""

import json

import datasets
import pytest
import torch

from llm_finetune import finetuning
from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.preflight import validate
from llm_finetune.data.loaders import build_dataloaders, load_dataset_split
from llm_finetune.data.rows import DataError
from llm_finetune.distributed import DistInfo
from llm_finetune.model import load_tokenizer
from tests.helpers import FAST

ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))

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


def test_skipping_a_first_thousand_bad_rows_keeps_the_good_ones_after(tmp_path):
    """Rows are tokenised and written in batches of 1000, typed by the first batch: a first
    batch of nothing but bad rows (empty placeholders) could not take the good rows after it."""
    rows = [{"instruction": "x", "output": ""}] * 1000 + ROWS[:5]
    path = write_jsonl(tmp_path / "late.jsonl", rows)
    run = build_run_config(dataset="file_dataset", bad_rows="skip",
                           **{"file_dataset.data_files": str(path),
                              "file_dataset.eval_files": str(path)})
    samples = load_dataset_split(run, load_tokenizer(run.train), "train")
    assert len(samples) == 5 and all(len(ids) > 0 for ids in samples["input_ids"])


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


# llama-recipes' custom data set file shape: rows the collator reads (raw text and a column the
# model never sees), and get_data_collator(tokenizer), which tokenises, masks and pads them
COLLATED = '''
import datasets
import torch


def questions(dataset_config, tokenizer, split):
    count = 32 if split == "train" else 8
    return datasets.Dataset.from_list([{"question": f"What is {i} + {i}?", "answer": f"{2 * i}",
                                        "style": "terse"} for i in range(count)])


class QuestionAnswerCollator:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, rows):
        ids, labels = [], []
        for row in rows:
            assert row["style"] == "terse"  # every column reaches the collator
            prompt = self.tokenizer.encode(f"Q: {row['question']} A:")
            answer = self.tokenizer.encode(f" {row['answer']}", add_special_tokens=False)
            ids.append(prompt + answer + [self.tokenizer.eos_token_id])
            labels.append([-100] * len(prompt) + answer + [self.tokenizer.eos_token_id])
        longest = max(map(len, ids))
        pad = self.tokenizer.pad_token_id
        return {"input_ids": torch.tensor([i + [pad] * (longest - len(i)) for i in ids]),
                "labels": torch.tensor([l + [-100] * (longest - len(l)) for l in labels]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (longest - len(i))
                                                for i in ids])}


def get_data_collator(processor):
    return QuestionAnswerCollator(processor)
'''


def test_custom_dataset_with_its_own_collator(tmp_path):
    """As llama-recipes: get_custom_dataset's rows go whole to get_data_collator's collator,
    for the train and eval batches (``file.py:function`` names the data set function)."""
    module = tmp_path / "qa_dataset.py"
    module.write_text(COLLATED)
    settings = dict(dataset="custom_dataset", **{"custom_dataset.file": f"{module}:questions"})
    run = build_run_config(**settings, batch_size_training=4, val_batch_size=4)
    tokenizer = load_tokenizer(run.train)
    train, evals = build_dataloaders(run, tokenizer, ONE_PROCESS)
    batch = next(iter(train))
    assert set(batch) == {"input_ids", "labels", "attention_mask", "num_tokens"}
    assert batch["num_tokens"] == batch["attention_mask"].sum()
    learned = tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    assert "Q:" not in learned and learned.endswith("</s>")
    assert len(evals) == 2  # 8 eval rows in batches of 4

    summary = finetuning.main(**{**FAST, "max_train_step": 6, "lr": 3e-3, **settings},
                              output_dir=str(tmp_path / "out"))
    losses = [m["loss"] for m in summary["metrics"] if "loss" in m]
    assert losses[-1] < losses[0] and summary["eval_loss"]

    with pytest.raises(DataError, match="defines get_data_collator.*--batching_strategy padding"):
        build_dataloaders(build_run_config(**settings, batching_strategy="packing"), tokenizer,
                          ONE_PROCESS)


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
    sample = load_dataset_split(run, tokenizer, run.dataset.train_split)[3]
    assert tokenizer.decode(sample["input_ids"][1:]).startswith(
        "Correct this to standard English: he go 3\n---\nCorrected: he goes 3")


def test_samsum_comes_from_knkarthick_on_the_hub(monkeypatch):
    """The samsum copy the cookbook reads now (in place of Samsung/samsum)."""
    asked = []

    def hub(name, config=None, split=None):
        asked.append((name, split))
        return datasets.Dataset.from_list([{"id": "1", "dialogue": "A: hi\nB: yo",
                                            "summary": "They greet."}] * 4)

    monkeypatch.setattr(datasets, "load_dataset", hub)
    run = build_run_config(dataset="samsum_dataset")
    assert len(load_dataset_split(run, load_tokenizer(run.train), "validation")) == 4
    assert asked == [("knkarthick/samsum", "validation")]


def test_samsum_from_a_local_copy_of_the_hub_files(tmp_path):
    for split, count in (("train", 12), ("validation", 3)):
        datasets.Dataset.from_list([{"id": str(i), "dialogue": f"A: hi {i}\nB: hello",
                                     "summary": f"They greet {i}."} for i in range(count)]
                                   ).to_csv(tmp_path / f"{split}.csv")
    run = build_run_config(dataset="samsum_dataset", **{"samsum_dataset.hub_name": str(tmp_path)})
    tokenizer = load_tokenizer(run.train)
    assert len(load_dataset_split(run, tokenizer, "train")) == 12
    assert len(load_dataset_split(run, tokenizer, "validation")) == 3


JFLEG = {"validation": [{"sentence": "He do n't like it .", "corrections": [
             "He does n't like it .", "He doesn't like it.", ""]},
                        {"sentence": "I goes , you go .", "corrections": ["I go , you go ."]}],
         "test": [{"sentence": "She have a cat .", "corrections": ["She has a cat ."]}]}


def test_grammar_from_jfleg_rows_as_llama_recipes_prepares_them(tmp_path):
    """jfleg's splits and columns (a sentence, its corrections, tokenised text) become one
    input/target pair per correction, spacing undone: train from its validation split, eval
    from its test split, as llama-recipes' notebook makes gtrain and grammar_validation."""
    for split, rows in JFLEG.items():
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    run = build_run_config(dataset="grammar_dataset", **{"grammar_dataset.hub_name": str(tmp_path)})
    tokenizer = load_tokenizer(run.train)

    def pairs(split):
        return [tokenizer.decode(s["input_ids"][1:-1])
                for s in load_dataset_split(run, tokenizer, split)]

    assert pairs(run.dataset.train_split) == [
        "Correct this to standard English: He don't like it.\n---\nCorrected: He doesn't like it.",
        "Correct this to standard English: He don't like it.\n---\nCorrected: He doesn't like it.",
        "Correct this to standard English: I goes, you go.\n---\nCorrected: I go, you go."]
    assert pairs(run.dataset.test_split) == [
        "Correct this to standard English: She have a cat.\n---\nCorrected: She has a cat."]


def test_grammar_splits_may_name_csv_files_as_in_llama_recipes(tmp_path):
    for name in ("gtrain_10k.csv", "grammar_validation.csv"):
        (tmp_path / name).write_text("input,target\n" + "he go,he goes\n" * 5)
    run = build_run_config(dataset="grammar_dataset", **{
        "grammar_dataset.train_split": str(tmp_path / "gtrain_10k.csv"),
        "grammar_dataset.test_split": str(tmp_path / "grammar_validation.csv")})
    validate(run, world_size=1, cuda=False)
    tokenizer = load_tokenizer(run.train)
    assert len(load_dataset_split(run, tokenizer, run.dataset.train_split)) == 5
    assert len(load_dataset_split(run, tokenizer, run.dataset.test_split)) == 5


def test_alpaca_eval_split_is_its_first_5_percent(tmp_path):
    path = tmp_path / "alpaca_data.json"
    path.write_text(json.dumps(ROWS))
    run = build_run_config(**{"alpaca_dataset.data_path": str(path)})
    tokenizer = load_tokenizer(run.train)
    evals = load_dataset_split(run, tokenizer, "val")
    assert len(evals) == 2 and len(load_dataset_split(run, tokenizer, "train")) == 38
    assert tokenizer.decode(evals[1]["input_ids"]).count("Add 1 and 2.") == 1
    path.write_text(json.dumps(ROWS[:19]))
    with pytest.raises(DataError, match="19 rows leave no eval split .*--run_validation False"):
        load_dataset_split(run, tokenizer, "val")


def test_hub_data_set_offline_says_what_to_do(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    run = build_run_config(dataset="samsum_dataset")
    with pytest.raises(DataError, match="--samsum_dataset.train_file and --samsum_dataset.eval_file"):
        load_dataset_split(run, load_tokenizer(run.train), "train")


def test_llamaguard_toxicchat_learns_only_the_verdict(tmp_path):
    """toxic-chat rows in Llama Guard 3's prompt (the formatter's default layout): the label is
    safe / unsafe + the top moderation category as a Llama Guard code; the prompt has no loss;
    a malformed row is named. (Its earlier prompt: tests/test_llama_guard.py.)"""
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
        assert "\nS10: Hate.\n" in prompt and "S14: Code Interpreter Abuse." in prompt
        assert prompt.endswith("violated categories.<|eot_id|><|start_header_id|>assistant"
                               "<|end_header_id|>\n\n")
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
