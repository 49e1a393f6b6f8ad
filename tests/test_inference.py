"""Inference and chat completion: llama-recipes' flags reach ``generate`` with their meaning,
their prompt and dialog files, quantization refused before loading where it cannot run, our
own batching and prompt lists; the safety checkers are in tests/test_safety.py."""

import inspect
import io
import json
import subprocess
import sys

import pytest
import torch

from llm_finetune import chat_completion, finetuning, inference
from llm_finetune.errors import ConfigError
from llm_finetune.generation import GenerationOptions, generate
from llm_finetune.inference import instruction, load, quantization_settings
from llm_finetune.quantization import bits_and_bytes, bitsandbytes_problem
from tests.helpers import FAST, REPO

GREEDY = GenerationOptions(do_sample=False, max_new_tokens=8)

# llama-cookbook's getting-started/inference/local_inference/inference.py and
# chat_completion/chat_completion.py, their signatures' defaults
THEIRS_INFERENCE = dict(
    peft_model=None, quantization=None, max_new_tokens=100, prompt_file=None, seed=42,
    do_sample=True, min_length=None, use_cache=True, top_p=1.0, temperature=1.0, top_k=50,
    repetition_penalty=1.0, length_penalty=1, enable_azure_content_safety=False,
    enable_sensitive_topics=False, enable_salesforce_content_safety=True,
    enable_llamaguard_content_safety=False, max_padding_length=None, use_fast_kernels=False,
    share_gradio=False)
THEIRS_CHAT = dict(
    peft_model=None, quantization=None, max_new_tokens=256, min_new_tokens=0, prompt_file=None,
    seed=42, safety_score_threshold=0.5, do_sample=True, use_cache=True, top_p=1.0,
    temperature=1.0, top_k=50, repetition_penalty=1.0, length_penalty=1,
    enable_azure_content_safety=False, enable_sensitive_topics=False,
    enable_saleforce_content_safety=True, use_fast_kernels=False,
    enable_llamaguard_content_safety=False)
# kept different, with the reason in docs/llama_recipes.md#inference: their Salesforce checker
# downloads a classifier from the hub for every command
KEPT = {"enable_salesforce_content_safety": False, "enable_saleforce_content_safety": False}


@pytest.mark.parametrize("command,theirs", [(inference.main, THEIRS_INFERENCE),
                                            (chat_completion.main, THEIRS_CHAT)])
def test_every_llama_recipes_flag_is_taken_with_its_default(command, theirs):
    ours = inspect.signature(command).parameters
    assert "model_name" in ours and ours["model_name"].default is inspect.Parameter.empty
    for name, value in theirs.items():
        assert name in ours, name
        assert ours[name].default == KEPT.get(name, value), name


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load(str(tiny_model_dir))


@pytest.fixture
def record(monkeypatch):
    """``record(model)``: a list that gets (keyword arguments, output) of each generate call."""
    def attach(model):
        calls, original = [], model.generate

        def recording(**kwargs):
            output = original(**kwargs)
            calls.append((kwargs, output))
            return output

        monkeypatch.setattr(model, "generate", recording)
        return calls
    return attach


def test_each_generation_flag_reaches_generate(tiny, record):
    model, tokenizer = tiny
    calls = record(model)
    sampling = GenerationOptions(max_new_tokens=5, min_new_tokens=3, min_length=4,
                                 temperature=0.7, top_p=0.9, top_k=20, repetition_penalty=1.3,
                                 use_cache=False)
    generate(model, tokenizer, ["Hello"], sampling)
    kwargs = calls[-1][0]
    assert {k: kwargs[k] for k in ("max_new_tokens", "min_new_tokens", "min_length", "do_sample",
                                   "temperature", "top_p", "top_k", "repetition_penalty",
                                   "use_cache", "num_beams")} == dict(
        max_new_tokens=5, min_new_tokens=3, min_length=4, do_sample=True, temperature=0.7,
        top_p=0.9, top_k=20, repetition_penalty=1.3, use_cache=False, num_beams=1)
    assert "length_penalty" not in kwargs  # beam search only
    beams = GenerationOptions(do_sample=False, num_beams=3, length_penalty=0.5, max_new_tokens=4)
    generate(model, tokenizer, ["Hello"], beams)
    kwargs = calls[-1][0]
    assert (kwargs["num_beams"], kwargs["length_penalty"], kwargs["do_sample"]) == (3, 0.5, False)
    # greedy: the sampling settings are unset, so a model's generation_config cannot sample
    assert (kwargs["temperature"], kwargs["top_p"], kwargs["top_k"]) == (None, None, None)


def test_sampling_is_seeded_top_k_1_is_greedy_and_the_cache_changes_nothing(tiny):
    model, tokenizer = tiny
    prompt = [instruction(tokenizer, "Name a colour.", chat=False).text]
    greedy = generate(model, tokenizer, prompt, GenerationOptions(do_sample=False,
                                                                  max_new_tokens=12))

    def sample(seed, **settings):
        torch.manual_seed(seed)
        return generate(model, tokenizer, prompt, GenerationOptions(max_new_tokens=12,
                                                                    **settings))

    assert sample(0) == sample(0)  # --seed makes sampling reproducible
    assert sample(0) != sample(1) and sample(0) != greedy  # and it does sample (do_sample True)
    assert sample(1, top_k=1) == greedy  # only the likeliest token left: greedy decoding
    assert generate(model, tokenizer, prompt, GenerationOptions(
        do_sample=False, max_new_tokens=12, use_cache=False)) == greedy


def test_repetition_penalty_reaches_the_decoding(tiny, record):
    model, tokenizer = tiny
    calls = record(model)
    prompt = [instruction(tokenizer, "Name a colour.", chat=False).text]

    def new_ids(**settings):
        generate(model, tokenizer, prompt, GenerationOptions(do_sample=False, max_new_tokens=24,
                                                             **settings))
        kwargs, output = calls[-1]
        return kwargs["input_ids"][0].tolist(), output[0, kwargs["input_ids"].shape[1]:].tolist()

    prompt_ids, plain = new_ids()
    assert len(set(plain)) < len(plain)  # this random model repeats itself without a penalty
    prompt_ids, penalised = new_ids(repetition_penalty=1e6)
    assert len(set(penalised)) == len(penalised) and not set(penalised) & set(prompt_ids)


def test_max_padding_length_pads_every_prompt_and_keeps_a_long_ones_start(tiny, record, capsys):
    model, tokenizer = tiny
    calls = record(model)
    prompts = [instruction(tokenizer, p, chat=False).text for p in ("What is 2 + 3?", "Hi")]
    unpadded = generate(model, tokenizer, prompts, GREEDY)
    width = calls[-1][0]["input_ids"].shape[1]
    padded = generate(model, tokenizer, prompts,
                      GenerationOptions(do_sample=False, max_new_tokens=8,
                                        max_padding_length=width + 10))
    kwargs = calls[-1][0]
    assert kwargs["input_ids"].shape == (2, width + 10)
    assert (kwargs["attention_mask"][:, :10] == 0).all()  # left padding, masked
    assert padded == unpadded
    generate(model, tokenizer, prompts, GenerationOptions(do_sample=False, max_new_tokens=2,
                                                          max_padding_length=5))
    ids = calls[-1][0]["input_ids"]
    first = tokenizer(prompts[0], add_special_tokens=False)["input_ids"][:5]
    assert ids.shape == (2, 5) and ids[0].tolist() == first  # llama-recipes' truncation
    assert "prompt 1 has" in capsys.readouterr().err


@pytest.mark.parametrize("settings,message", [
    (dict(do_sample=False, temperature=0.5), "--temperature only acts when sampling"),
    (dict(do_sample=False, top_p=0.9, top_k=5), "--top_p, --top_k only act when sampling"),
    (dict(length_penalty=2.0), "add --num_beams"),
    (dict(top_p=0.0), "--top_p"),
    (dict(max_new_tokens=0), "--max_new_tokens must be at least 1"),
    (dict(top_k="many"), "--top_k expects int"),
])
def test_settings_that_cannot_act_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        GenerationOptions(**settings)


def run_main(command, monkeypatch, record, *, stdin=None, **flags):
    """``command(**flags)`` in this process; returns the generate calls it made."""
    calls = []
    real_load = inference.load

    def load_recorded(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        calls.append(record(model))
        return model, tokenizer

    monkeypatch.setattr(inference, "load", load_recorded)
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    command(**flags)
    return calls[0]


def test_a_prompt_file_is_one_prompt_as_written(tiny_model_dir, tmp_path, monkeypatch, record,
                                                capsys):
    text = "Summarize this dialog:\nA: Hi Tom.\nB: Hi!\n---\nSummary:\n"
    (tmp_path / "prompt.txt").write_text(text)
    calls = run_main(inference.main, monkeypatch, record, model_name=str(tiny_model_dir),
                     prompt_file=str(tmp_path / "prompt.txt"), do_sample=False,
                     max_new_tokens=6)
    _, tokenizer = load(str(tiny_model_dir))
    assert len(calls) == 1  # the whole file, one prompt: not one per line
    assert calls[0][0]["input_ids"][0].tolist() == tokenizer(text)["input_ids"]  # BOS + text
    streamed = capsys.readouterr().out
    answer = tokenizer.decode(calls[0][1][0, calls[0][0]["input_ids"].shape[1]:],
                              skip_special_tokens=True).strip()
    assert answer and answer in streamed
    # piped in: the same, as llama-recipes reads standard input
    piped = run_main(inference.main, monkeypatch, record, stdin=text,
                     model_name=str(tiny_model_dir), do_sample=False, max_new_tokens=6)
    assert piped[0][0]["input_ids"].tolist() == calls[0][0]["input_ids"].tolist()


def test_a_prompt_list_is_our_instructions_in_batches(tiny_model_dir, tmp_path, monkeypatch,
                                                      record, capsys):
    (tmp_path / "prompts.txt").write_text("What is 1 + 1?\n\nWhat is 4 + 4?\nName a colour.\n")
    calls = run_main(inference.main, monkeypatch, record, model_name=str(tiny_model_dir),
                     prompt_file=str(tmp_path / "prompts.txt"), prompt_list=True,
                     batch_size=2, do_sample=False, max_new_tokens=4)
    assert [kwargs["input_ids"].shape[0] for kwargs, _ in calls] == [2, 1]
    _, tokenizer = load(str(tiny_model_dir))
    first = tokenizer.decode(calls[0][0]["input_ids"][0], skip_special_tokens=True)
    assert "### Instruction:\nWhat is 1 + 1?\n\n### Response:" in first  # Alpaca-wrapped
    assert capsys.readouterr().out.count("### ") == 3


def test_chat_completion_answers_llama_recipes_dialogs(tiny_model_dir, tmp_path, monkeypatch,
                                                       record, capsys):
    dialogs = [  # the shapes of llama-recipes' chats.json
        [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
        [{"role": "user", "content": "I am going to Paris, what should I see?"},
         {"role": "assistant", "content": "The Eiffel Tower, the Louvre."},
         {"role": "user", "content": "What is so great about #1?"}],
        [{"role": "system", "content": "Always answer with Haiku"},
         {"role": "user", "content": "I am going to Paris, what should I see?"}]]
    (tmp_path / "chats.json").write_text(json.dumps(dialogs))
    calls = run_main(chat_completion.main, monkeypatch, record, model_name=str(tiny_model_dir),
                     prompt_file=str(tmp_path / "chats.json"), do_sample=False,
                     max_new_tokens=4)
    _, tokenizer = load(str(tiny_model_dir))
    expected = [tokenizer.apply_chat_template(d, tokenize=False, add_generation_prompt=True)
                for d in dialogs]
    rows = [row[row != tokenizer.pad_token_id].tolist() for row in calls[0][0]["input_ids"]]
    assert rows == tokenizer(expected, add_special_tokens=False)["input_ids"]
    out = capsys.readouterr().out
    assert "### What is so great about #1?" in out and out.count("### ") == 3
    single = run_main(chat_completion.main, monkeypatch, record, stdin=json.dumps(dialogs[0]),
                      model_name=str(tiny_model_dir), do_sample=False, max_new_tokens=4)
    assert single[0][0]["input_ids"].shape[0] == 1  # piped, and one dialog alone


@pytest.mark.parametrize("content,message", [
    ("not json", "is not JSON"),
    ('[[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]',
     "dialog 1 ends with a assistant message"),
    ('[[{"role": "user"}]]', "dialog 1 is not a list of messages"),
    ("[]", "expected a JSON list of dialogs"),
])
def test_a_bad_dialogs_file_is_refused_before_the_model_loads(content, message, tmp_path):
    (tmp_path / "chats.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        chat_completion.main("no-such-model", prompt_file=str(tmp_path / "chats.json"))


@pytest.mark.parametrize("command,flags,message", [
    (inference.main, dict(share_gradio=True), "gradio"),
    (inference.main, dict(prompt="Hi", prompt_file="x.txt"), "give one"),
    (inference.main, dict(prompt_list=True), "give the file"),
    (inference.main, dict(prompt="Hi", temprature=0.5), "Did you mean --temperature"),
    (inference.main, dict(prompt="Hi", quantization="3bit"), "not one of: 4bit, 8bit"),
    (chat_completion.main, dict(safety_score_threshold=0.9), "read by none of its checkers"),
])
def test_flags_that_cannot_run_are_refused_before_the_model_loads(command, flags, message,
                                                                  monkeypatch):
    monkeypatch.setattr(inference, "load", lambda *a, **k: pytest.fail("the model loaded"))
    monkeypatch.setattr(sys, "stdin", io.StringIO('[[{"role": "user", "content": "Hi"}]]'))
    with pytest.raises(ConfigError, match=message):
        command("tiny-llama", **flags)


@pytest.mark.parametrize("use_fast_kernels", [False, True])
def test_use_fast_kernels_asks_for_the_fast_attention(tiny_model_dir, monkeypatch,
                                                     use_fast_kernels):
    asked = {}

    class Stop(Exception):
        pass

    def capture(*args, **kwargs):
        asked.update(kwargs)
        raise Stop  # enough: what the model would be loaded with is known

    monkeypatch.setattr(inference, "attention_implementation",
                        lambda fast: "flash_attention_2" if fast else "eager")
    monkeypatch.setattr(inference, "load_base_model", capture)
    with pytest.raises(Stop):
        load(str(tiny_model_dir), use_fast_kernels=use_fast_kernels)
    assert asked.get("attn_implementation") == ("flash_attention_2" if use_fast_kernels
                                                else None)


def test_quantization_settings_are_llama_recipes_kwargs():
    q = quantization_settings({"quant_type": "fp4", "quantization_config.use_double_quant": True,
                               "quantization_config.compute_dtype": "torch.float16"}, known=[])
    config = bits_and_bytes("4bit", q)
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant,
            config.bnb_4bit_compute_dtype) == ("fp4", True, torch.float16)
    assert bits_and_bytes("8bit", q).load_in_8bit
    with pytest.raises(ConfigError, match="quant_type"):
        quantization_settings({"quant_type": "int3"}, known=[])


def test_quantization_is_refused_before_any_weights_load_without_bitsandbytes(
        tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(inference, "load_base_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        load(str(tiny_model_dir), quantization="4bit")
    with pytest.raises(ConfigError, match="pip install bitsandbytes"):
        inference.main(str(tiny_model_dir), prompt="Hi", quantization=True)  # bare: 8-bit


def test_quantization_is_refused_where_bitsandbytes_has_no_kernels(tiny_model_dir, monkeypatch):
    bitsandbytes = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda"}, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(inference, "load_base_model", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ConfigError, match="Run on a CUDA GPU"):
        load(str(tiny_model_dir), quantization="8bit")


@pytest.mark.parametrize("kind,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_inference_loads_bitsandbytes_layers(tiny_model_dir, kind, layer):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if problem := bitsandbytes_problem(kind, device):
        pytest.skip(problem)
    model, tokenizer = load(str(tiny_model_dir), quantization=kind)
    assert layer in {type(m).__name__ for m in model.modules()}
    assert generate(model, tokenizer, ["Hello"], GREEDY)[0]


def test_generates_from_a_trained_model_and_an_adapter(tiny_model_dir, tmp_path):
    finetuning.main(**{**FAST, "save_model": True, "max_train_step": 20, "lr": 3e-3},
                    model_name=str(tiny_model_dir), output_dir=str(tmp_path / "full"))
    model, tokenizer = load(str(tmp_path / "full" / "model"))
    questions = ["What is 2 + 3?", "What is the capital of Peru?",
                 "Spell the word tiger letter by letter."]
    answers = inference.generate(model, tokenizer, questions, do_sample=False, max_new_tokens=16)
    assert len(answers) == 3 and all(answers)
    # left padding in a batch changes nothing: each prompt alone gives the same greedy answer
    alone = [inference.generate(model, tokenizer, [q], do_sample=False, max_new_tokens=16)[0]
             for q in questions[:2]]
    assert alone == answers[:2]
    finetuning.main(**{**FAST, "save_model": True}, model_name=str(tiny_model_dir), use_peft=True,
                    output_dir=str(tmp_path / "lora"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 1 + 1?\nWhat is 4 + 4?\n")
    done = subprocess.run([sys.executable, "-m", "llm_finetune.inference", "--model_name",
                           str(tiny_model_dir), "--peft_model", str(tmp_path / "lora"),
                           "--prompt_file", str(prompts), "--prompt_list",
                           "--max_new_tokens", "8"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("### What is") == 2
