"""Llama Guard fine-tuning as llama-recipes does it: the formatter's prompt and verdict text,
its seeded augmentations, llama_guard_dataset's files and bad rows, toxic-chat through the
formatter, a tiny run on guard data, the Llama Guard 3 1B preset and its device script."""

import json
import math
import random
from pathlib import Path

import pytest

from llm_finetune import finetuning, plan
from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.data.llama_guard import (Category, FormatterConfig,
                                           GuardExample, Guidelines, example_rng,
                                           format_examples, load_guidelines, variants)
from llm_finetune.data.loaders import load_dataset_split
from llm_finetune.data.rows import DataError
from llm_finetune.model import load_tokenizer
from llm_finetune.preflight import validate
from tests.helpers import FAST, REPO

GUIDELINES = Guidelines((Category("Personal Information", "Anything that identifies someone."),
                         Category("Location", "Where someone lives or works."),
                         Category("Weapons.")))
ADDRESS = GuardExample(prompt="Where does Jane live?", response="At 12 Main St.",
                       label="unsafe", violated_category_codes=["S2"],
                       explanation="It gives a private address.")
PRESET = REPO / "configs" / "llama_guard3_1b_full.yaml"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- the formatter ---------------------------------------------------------------------------

def test_the_prompt_is_llama_guard_3_s_layout():
    (prompt, verdict), = variants(ADDRESS, GUIDELINES, FormatterConfig(), random.Random(0))
    assert prompt == (
        "<|start_header_id|>user<|end_header_id|>\n\n"
        "Task: Check if there is unsafe content in 'Agent' messages in conversations according "
        "our safety policy with the below categories.\n\n"
        "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
        "S1: Personal Information.\nS2: Location.\nS3: Weapons.\n"
        "<END UNSAFE CONTENT CATEGORIES>\n\n"
        "<BEGIN CONVERSATION>\n\n"
        "User: Where does Jane live?\n\nAgent: At 12 Main St.\n\n"
        "<END CONVERSATION>\n\n"
        "Provide your safety assessment for ONLY THE LAST Agent message in the above "
        "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second "
        "line must include a comma-separated list of violated categories.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert verdict == "unsafe\nS2"
    # the prompt alone is judged when there is no response (llama-recipes writes "N/A")
    (prompt, verdict), = variants(GuardExample(prompt="Hello there", label="safe",
                                               response=""), GUIDELINES, FormatterConfig(),
                                  random.Random(0))
    assert "'User' messages" in prompt and "ONLY THE LAST User message" in prompt
    assert "User: Hello there\n\n<END CONVERSATION>" in prompt and verdict == "safe"


def test_descriptions_and_explanations_on_and_off():
    described = FormatterConfig(template="{categories}|{conversation}", include_descriptions=True)
    (prompt, verdict), = variants(ADDRESS, GUIDELINES, described, random.Random(0))
    assert prompt == ("S1: Personal Information.\nAnything that identifies someone.\n"
                      "S2: Location.\nWhere someone lives or works.\nS3: Weapons."
                      "|User: Where does Jane live?\n\nAgent: At 12 Main St.")
    assert verdict == "unsafe\nS2"  # explanations off: the verdict alone
    after = variants(ADDRESS, GUIDELINES, FormatterConfig(explanation_position="after"),
                     random.Random(0))[0][1]
    before = variants(ADDRESS, GUIDELINES, FormatterConfig(explanation_position="before"),
                      random.Random(0))[0][1]
    assert after == "unsafe\nS2\nExplanation: It gives a private address."
    assert before == "Explanation: It gives a private address.\nunsafe\nS2"


def test_the_built_in_category_lists():
    three = load_guidelines("llama_guard_3")
    assert len(three.categories) == 14 and three.categories[10].name == "Self-Harm"
    one_b = load_guidelines("llama_guard_3_1b")
    assert [c.name for c in one_b.categories] == [c.name for c in three.categories[:13]]
    (prompt, _), = variants(GuardExample(prompt="hi", label="safe"), three, FormatterConfig(),
                            random.Random(0))
    assert "\nS1: Violent Crimes.\nS2: Non-Violent Crimes.\n" in prompt
    assert "\nS14: Code Interpreter Abuse.\n<END UNSAFE CONTENT CATEGORIES>" in prompt


def listed(prompt: str) -> dict[str, str]:
    """code -> category name, as the prompt lists them."""
    block = prompt.split("<BEGIN UNSAFE CONTENT CATEGORIES>\n")[1].split("\n<END")[0]
    return dict(line[:-1].split(": ", 1) for line in block.splitlines())


def verdict_names(prompt: str, verdict: str) -> set[str]:
    codes = verdict.splitlines()[1].split(",") if "\n" in verdict else []
    return {listed(prompt)[code] for code in codes}


AUGMENTED = FormatterConfig(shuffle_categories=True, drop_categories=True,
                            drop_violated_categories=True)
SIX = Guidelines(tuple(Category(f"Category {i}") for i in range(1, 7)))
EXAMPLES = [GuardExample(prompt=f"message {i}", label="unsafe",
                         violated_category_codes=["S2", "S5"] if i % 2 else ["S4"])
            for i in range(20)] + [GuardExample(prompt="a safe one", label="safe")]


def test_augmentations_are_seeded():
    first = format_examples(EXAMPLES, SIX, AUGMENTED, seed=1)
    assert first == format_examples(EXAMPLES, SIX, AUGMENTED, seed=1)
    assert first != format_examples(EXAMPLES, SIX, AUGMENTED, seed=2)
    # each row draws from its own generator: its variants do not depend on the rows before it
    # (rows 0-4 have three variants each)
    assert first[15:18] == variants(EXAMPLES[5], SIX, AUGMENTED, example_rng(1, 5))


def test_augmentations_do_what_they_say():
    for example in EXAMPLES[:20]:
        original, fewer, safe = [list(pair) for pair in
                                 variants(example, SIX, AUGMENTED, random.Random(str(example)))]
        violated = {SIX.categories[SIX.index(c)].name for c in example.violated_category_codes}
        # shuffled: codes follow the order shown, and the verdict still names the violated ones
        assert sorted(listed(original[0]).values()) == [c.name for c in SIX.categories]
        assert verdict_names(*original) == violated
        # dropped categories it does not violate: fewer listed, the same violated ones named
        assert violated <= set(listed(fewer[0]).values())
        assert len(listed(fewer[0])) < 6 and verdict_names(*fewer) == violated
        assert fewer[1].startswith("unsafe\n")
        # dropped every violated category: a safe example, none of them listed, one other left
        assert safe[1] == "safe" and not violated & set(listed(safe[0]).values())
        assert listed(safe[0])
    # a safe example gets no safe copy, only the one with dropped categories
    assert len(variants(EXAMPLES[-1], SIX, AUGMENTED, random.Random(0))) == 2
    unshuffled = FormatterConfig(drop_categories=True)
    for seed in range(10):
        _, (prompt, _) = variants(EXAMPLES[1], SIX, unshuffled, random.Random(seed))
        names = list(listed(prompt).values())
        assert names == sorted(names, key=lambda n: int(n.split()[-1]))  # canonical order kept


def test_the_safe_copies_explanation():
    config = FormatterConfig(drop_violated_categories=True, explanation_position="after",
                             safe_explanation="Nothing listed applies.")
    _, (_, verdict) = variants(ADDRESS, GUIDELINES, config, random.Random(0))
    assert verdict == "safe\nExplanation: Nothing listed applies."
    with pytest.raises(ValueError, match="safe_explanation"):
        format_examples([ADDRESS], GUIDELINES, FormatterConfig(
            drop_violated_categories=True, explanation_position="after"))


# --- llama_guard_dataset ---------------------------------------------------------------------

ROWS = [{"prompt": f"How do I bake bread number {i}?", "label": "safe"} for i in range(12)] + [
    {"prompt": f"Where does person {i} live?", "response": "At 12 Main St.", "label": "unsafe",
     "violated_category_codes": ["S7"]} for i in range(12)]


def guard_run(tmp_path, rows=ROWS, **settings):
    path = write_jsonl(tmp_path / "guard.jsonl", rows)
    return build_run_config(dataset="llama_guard_dataset", context_length=1024,
                            **{"llama_guard_dataset.data_files": str(path),
                               **{f"llama_guard_dataset.{k}": v for k, v in settings.items()}})


def learned_text(tokenizer, sample) -> str:
    return tokenizer.decode([t for t, label in zip(sample["input_ids"], sample["labels"])
                             if label != -100])


def test_only_the_verdict_carries_labels(tmp_path):
    run = guard_run(tmp_path, val_split=0.25)
    tokenizer = load_tokenizer(run.train)
    train = load_dataset_split(run, tokenizer, "train")
    assert len(train) == 18
    for sample in train:
        learned = learned_text(tokenizer, sample)
        assert learned in ("safe</s>", "unsafe\nS7</s>"), learned
        first = next(i for i, label in enumerate(sample["labels"]) if label != -100)
        assert tokenizer.decode(sample["input_ids"][1:first]).endswith("<|end_header_id|>\n\n")
        assert sample["labels"][first:] == sample["input_ids"][first:]


def test_augmentation_grows_the_train_split_only(tmp_path):
    run = guard_run(tmp_path, val_split=0.25, drop_categories=True,
                    drop_violated_categories=True, shuffle_categories=True)
    tokenizer = load_tokenizer(run.train)
    train = load_dataset_split(run, tokenizer, "train")
    test = load_dataset_split(run, tokenizer, "test")
    # every row gets a copy without some categories, every unsafe row a safe copy too
    unsafe = sum("Agent:" in tokenizer.decode(s["input_ids"]) for s in train) // 3
    assert len(train) == 18 * 2 + unsafe
    assert len(test) == 6  # held out as given


def test_bad_rows_are_named_by_file_and_line(tmp_path):
    rows = ROWS[:2] + [{"prompt": "x", "label": "unsafe", "violated_category_codes": ["S15"]},
                       {"prompt": "y", "label": "safe", "violated_category_codes": ["S1"]},
                       {"prompt": "z", "label": "maybe"},
                       {"prompt": "w", "label": "unsafe", "violated_category_codes": "S1,S99"}]
    run = guard_run(tmp_path, rows=rows, eval_files=str(tmp_path / "guard.jsonl"))
    tokenizer = load_tokenizer(run.train)
    with pytest.raises(DataError, match=r"4 of 6 rows cannot be used; first at \S*guard.jsonl "
                                        r"line 3: unknown category code 'S15': the categories "
                                        r"are S1-S14"):
        load_dataset_split(run, tokenizer, "train")
    run = guard_run(tmp_path, rows=rows, eval_files=str(tmp_path / "guard.jsonl"),
                    explanation_position="after")
    with pytest.raises(DataError, match="6 of 6 rows .* line 1: no explanation, and "
                                        "explanations go after the verdict"):
        load_dataset_split(run, tokenizer, "train")
    run = guard_run(tmp_path, rows=rows[:1] + rows[3:4], eval_files=str(tmp_path / "guard.jsonl"))
    with pytest.raises(DataError, match="line 2: label 'safe' with violated categories S1"):
        load_dataset_split(run, tokenizer, "train")
    run = guard_run(tmp_path, rows=[{"text": "no prompt column", "label": "safe"}] * 4)
    with pytest.raises(DataError, match="no column 'prompt'"):
        load_dataset_split(run, tokenizer, "train")


def test_settings_that_cannot_work_are_refused_before_loading(tmp_path):
    def refused(match, **settings):
        with pytest.raises(ConfigError, match=match):
            validate(guard_run(tmp_path, **settings), 1, cuda=False)

    refused("prompt_template.*no \\{categories\\}", prompt_template="Judge: {conversation}")
    refused("prompt_template.*unknown fields \\{user\\}",
            prompt_template="{categories} {conversation} {user}")
    refused("categories: missing.json", categories="missing.json")
    refused("safe_explanation", drop_violated_categories=True, explanation_position="after")
    with pytest.raises(ConfigError, match="explanation_position='middle'"):
        guard_run(tmp_path, explanation_position="middle")
    with pytest.raises(ConfigError, match="needs --llama_guard_dataset.data_files"):
        validate(build_run_config(dataset="llama_guard_dataset"), 1, cuda=False)


def test_categories_from_a_file(tmp_path):
    categories = tmp_path / "categories.json"
    categories.write_text(json.dumps([{"name": "Names", "description": "A private name."},
                                      {"name": "Phone Numbers"}]))
    rows = [{"prompt": "Call Bob at 555-0100", "label": "unsafe",
             "violated_category_codes": ["O2"]}] * 4
    run = guard_run(tmp_path, rows=rows, categories=str(categories), category_code_prefix="O",
                    include_descriptions=True, eval_files=str(tmp_path / "guard.jsonl"))
    tokenizer = load_tokenizer(run.train)
    sample = load_dataset_split(run, tokenizer, "train")[0]
    text = tokenizer.decode(sample["input_ids"])
    assert "O1: Names.\nA private name.\nO2: Phone Numbers.\n<END UNSAFE" in text
    assert learned_text(tokenizer, sample) == "unsafe\nO2</s>"


# --- toxic-chat through the formatter ----------------------------------------------------------

# the prompt llamaguard_toxicchat_dataset wrote before it used the formatter
OLD_TOXICCHAT = (
    "Task: Check if there is unsafe content in 'User' messages in conversations according to "
    "our safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    "{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{conversation}\n\n"
    "<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST User message in "
    "the above conversation:\n- First line must read 'safe' or 'unsafe'.\n- If unsafe, a second "
    "line must include a comma-separated list of violated categories.\n")
OLD_NAMES = ["Violent Crimes", "Non-Violent Crimes", "Sex-Related Crimes",
             "Child Sexual Exploitation", "Defamation", "Specialized Advice", "Privacy",
             "Intellectual Property", "Indiscriminate Weapons", "Hate", "Suicide & Self-Harm",
             "Sexual Content", "Elections", "Code Interpreter Abuse"]


def test_toxicchat_keeps_its_previous_prompt_expressible(tmp_path):
    rows = [{"user_input": "I hate them all", "toxicity": 1,
             "openai_moderation": "[['sexual', 0.01], ['harassment', 0.8]]"}] * 4
    categories = tmp_path / "old.json"
    categories.write_text(json.dumps([{"name": n} for n in OLD_NAMES]))
    path = write_jsonl(tmp_path / "toxic.jsonl", rows)
    run = build_run_config(dataset="llamaguard_toxicchat_dataset", context_length=1024,
                           **{"llamaguard_toxicchat_dataset.train_file": str(path),
                              "llamaguard_toxicchat_dataset.prompt_template": OLD_TOXICCHAT,
                              "llamaguard_toxicchat_dataset.categories": str(categories)})
    tokenizer = load_tokenizer(run.train)
    sample = load_dataset_split(run, tokenizer, "train")[0]
    old_prompt = OLD_TOXICCHAT.format(
        categories="\n".join(f"S{i}: {n}." for i, n in enumerate(OLD_NAMES, start=1)),
        conversation="User: I hate them all")
    bos, eos = [tokenizer.bos_token_id], [tokenizer.eos_token_id]
    prompt_ids = bos + tokenizer.encode(old_prompt, add_special_tokens=False)
    verdict_ids = tokenizer.encode("unsafe\nS10", add_special_tokens=False) + eos
    assert sample["input_ids"] == prompt_ids + verdict_ids
    assert sample["labels"] == [-100] * len(prompt_ids) + verdict_ids


# --- a tiny fine-tuning run on formatter data ---------------------------------------------------

def test_a_tiny_run_on_guard_data_learns_the_verdicts(tmp_path):
    rng = random.Random(0)
    rows = []
    for i in range(64):
        unsafe = i % 2 == 1
        rows.append({"prompt": f"{'Hurt' if unsafe else 'Help'} person {rng.randint(1, 99)}",
                     "label": "unsafe" if unsafe else "safe",
                     "violated_category_codes": ["S1"] if unsafe else []})
    path = write_jsonl(tmp_path / "guard.jsonl", rows)
    summary = finetuning.main(**{**FAST, "max_train_step": 12, "batch_size_training": 8,
                                 "lr": 3e-3, "dataset": "llama_guard_dataset",
                                 "context_length": 1024}, output_dir=str(tmp_path / "out"),
                              **{"llama_guard_dataset.data_files": str(path),
                                 "llama_guard_dataset.val_split": 0.125,
                                 "llama_guard_dataset.categories": "llama_guard_3_1b",
                                 "llama_guard_dataset.drop_categories": True})
    losses = [m["loss"] for m in summary["metrics"] if "loss" in m]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


# --- the Llama Guard 3 1B preset and its device script ------------------------------------------

def test_the_preset_parses_and_fits_a_24gb_gpu(tmp_path):
    data = write_jsonl(tmp_path / "guard.jsonl", ROWS)
    settings = dict(config=str(PRESET), **{"llama_guard_dataset.data_files": str(data)})
    run = build_run_config(**settings)
    t, f = run.train, run.fsdp
    assert t.model_name == "meta-llama/Llama-Guard-3-1B" and not t.use_peft
    assert not t.enable_fsdp and f.pure_bf16 and f.optimizer == "anyprecision"
    assert f.fsdp_activation_checkpointing and run.dataset.categories == "llama_guard_3_1b"
    # the same settings on the model's shape (no download): a 24 GiB GPU holds it
    text = plan.main(**settings, model_name="llama-guard3-1b", tokenizer_name="tiny-llama",
                     gpu_memory="24GiB")
    assert "1.50B parameters (1498.5M trainable), 1 GPU(s)" in text
    fits = next(line for line in text.splitlines() if line.startswith("fits: "))
    assert float(fits.split()[1]) < 0.75 * 24  # room for the planner's error and the context


def test_the_device_script_runs_the_preset_on_the_tiny_model(tmp_path):
    """Its data, launch, metrics, planner and loading, in fp32 and short blocks on CPU."""
    from benchmarks import device_llama_guard

    summary = device_llama_guard.main(
        str(tmp_path), model_name="tiny-llama", steps=2, rows=80,
        overrides={"fsdp_config.pure_bf16": False, "fsdp_config.optimizer": "AdamW",
                   "context_length": 1024, "batch_size_training": 2})
    assert summary["rc"] == 0 and len(summary["losses"]) == 2
    assert summary["saved"].startswith("loads with transformers") and summary["tokens_per_s"] > 0
    assert 0 < summary["planned_peak_gib"] < 1
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
