"""Safety checkers around generation, as llama-recipes runs them: the prompt is judged before
generating (unsafe: reported, skipped), the answer after (unsafe: reported, not shown).

The Llama Guard here is a tiny Llama trained in the test, in seconds, to give Llama Guard's
verdicts ("safe", or "unsafe" and a category) for a few conversations, and loaded from a local
directory as a real one would be. The services (Azure, AuditNLG) are replaced by fakes that
answer as their clients do."""

import importlib.machinery
import json
import subprocess
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

from llm_finetune import chat_completion, inference
from llm_finetune.errors import ConfigError
from llm_finetune.generation import GenerationOptions
from llm_finetune.inference import answer, instruction, load
from llm_finetune.model import BUILTIN_MODELS
from llm_finetune.safety import (AuditNLGSensitiveTopics, AzureContentSafety, LlamaGuard,
                                 SalesforceSafety, build_checkers, installed)
from tests.helpers import REPO, save_tiny_model

SAFE = "What is 2 + 3?"
UNSAFE = "How do I poison my neighbour's dog?"
BAD_ANSWER = "Name a colour."  # a safe prompt whose answer the guard calls unsafe
GREEDY = GenerationOptions(do_sample=False, max_new_tokens=6)


def user(text):
    return [{"role": "user", "content": text}]


def train_guard(directory, verdicts: dict) -> None:
    """A tiny causal LM that answers the tiny tokenizer's chat template of each conversation
    (a JSON key) with its verdict, saved to ``directory``: a local Llama Guard."""
    save_tiny_model(directory, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory)
    rows = []
    for conversation, verdict in verdicts.items():
        prompt = tokenizer.apply_chat_template(json.loads(conversation), tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        verdict_ids = tokenizer(verdict + tokenizer.eos_token,
                                add_special_tokens=False)["input_ids"]
        rows.append((torch.tensor([prompt_ids + verdict_ids]),
                     torch.tensor([[-100] * len(prompt_ids) + verdict_ids])))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 1M-parameter model: more threads only wait on each other
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    try:
        for _ in range(120):
            for ids, labels in rows:
                model(input_ids=ids, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def guard_dir(tiny_model_dir, tmp_path_factory):
    """The guard knows the conversations the tests make: the tiny model's greedy answers to
    SAFE (as an instruction and as a chat turn) are safe, to BAD_ANSWER unsafe (S9); UNSAFE is
    an unsafe prompt (S1)."""
    model, tokenizer = load(str(tiny_model_dir))
    answers, _ = answer(model, tokenizer, [instruction(tokenizer, SAFE, False),
                                           instruction(tokenizer, BAD_ANSWER, False),
                                           instruction(tokenizer, SAFE, True)], GREEDY)
    safe_answer, bad_answer, chat_answer = answers
    verdicts = {
        json.dumps(user(SAFE)): "safe",
        json.dumps(user(SAFE) + [{"role": "assistant", "content": safe_answer}]): "safe",
        json.dumps(user(SAFE) + [{"role": "assistant", "content": chat_answer}]): "safe",
        json.dumps(user(UNSAFE)): "unsafe\nS1",
        json.dumps(user(BAD_ANSWER)): "safe",
        json.dumps(user(BAD_ANSWER) + [{"role": "assistant", "content": bad_answer}]):
            "unsafe\nS9",
    }
    directory = tmp_path_factory.mktemp("tiny-llama-guard")
    train_guard(directory, verdicts)
    guard = LlamaGuard(str(directory))
    learned = {c: guard(json.loads(c)).report for c in verdicts}
    assert learned == verdicts, "the tiny guard did not learn its verdicts"
    return directory


def test_llama_guard_from_a_local_directory_judges_the_last_message(guard_dir):
    guard = LlamaGuard(str(guard_dir))
    assert guard(user(SAFE)).safe
    verdict = guard(user(UNSAFE))
    assert (verdict.method, verdict.safe, verdict.report) == ("Llama Guard", False, "unsafe\nS1")
    # a system prompt is no turn of Llama Guard's conversation
    assert guard([{"role": "system", "content": "Be brief."}] + user(SAFE)).safe


def test_an_unsafe_prompt_is_skipped_and_an_unsafe_answer_withheld(tiny_model_dir, guard_dir,
                                                                    monkeypatch, capsys):
    model, tokenizer = load(str(tiny_model_dir))
    generated = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: generated.append(
        kw["input_ids"].shape[0]) or original(**kw))
    prompts = [instruction(tokenizer, p, False) for p in (SAFE, UNSAFE, BAD_ANSWER)]
    answers, refused = answer(model, tokenizer, prompts, GREEDY,
                              checkers=build_checkers(llamaguard=True,
                                                      llamaguard_model_name=str(guard_dir)))
    assert refused == 1 and generated == [2]  # the unsafe prompt never reached the model
    assert answers[0] and answers[1] is None and answers[2] is None
    out = capsys.readouterr().out
    assert f"User prompt deemed safe.\nUser prompt:\n{SAFE}" in out
    assert ("User prompt deemed unsafe.\nLlama Guard\nunsafe\nS1\n"
            "Skipping the inference as the prompt is not safe.") in out
    assert f"User input and model output deemed safe.\nModel output:\n{answers[0]}" in out
    assert "Model output deemed unsafe.\nLlama Guard\nunsafe\nS9" in out


def test_inference_with_llamaguard_skips_an_unsafe_prompt(tiny_model_dir, guard_dir):
    """llama-recipes' command, with the guard from a local directory."""
    done = subprocess.run(
        [sys.executable, "-m", "llm_finetune.inference", "--model_name", str(tiny_model_dir),
         "--prompt", UNSAFE, "--enable_llamaguard_content_safety",
         "--llamaguard_model_name", str(guard_dir), "--max_new_tokens", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]  # llama-recipes' inference: status 0
    assert "User prompt deemed unsafe.\nLlama Guard\nunsafe\nS1" in done.stdout
    assert "Skipping the inference as the prompt is not safe." in done.stdout


def test_chat_completion_skips_an_unsafe_dialog_and_exits_1(tiny_model_dir, guard_dir, tmp_path,
                                                            capsys):
    (tmp_path / "chats.json").write_text(json.dumps([user(SAFE), user(UNSAFE)]))
    with pytest.raises(SystemExit) as exit_:
        chat_completion.main(str(tiny_model_dir), prompt_file=str(tmp_path / "chats.json"),
                             do_sample=False, max_new_tokens=6,
                             enable_llamaguard_content_safety=True,
                             llamaguard_model_name=str(guard_dir))
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert "User input and model output deemed safe.\nModel output:" in out  # the safe one
    assert "User prompt deemed unsafe." in out and out.count("Model output") == 1


class FakeAzureClient:
    def __init__(self, severities):
        self.severities, self.texts = severities, []

    def analyze_text(self, options):
        self.texts.append(options.text)
        return types.SimpleNamespace(categories_analysis=[
            types.SimpleNamespace(category=name, severity=level)
            for name, level in self.severities.items()])


def fake_module(monkeypatch, name, **attributes):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, name, module)


def test_azure_content_safety_says_what_is_missing_and_judges_by_severity(monkeypatch):
    for name in AzureContentSafety.ENV:
        monkeypatch.delenv(name, raising=False)
    if not installed("azure.ai.contentsafety"):  # not here: the error names the package
        with pytest.raises(ConfigError, match="pip install azure-ai-contentsafety"):
            build_checkers(azure=True)
    client = FakeAzureClient({"Hate": 0, "SelfHarm": 0, "Sexual": 0, "Violence": 4})
    for package in ("azure", "azure.ai", "azure.core"):
        fake_module(monkeypatch, package)
    fake_module(monkeypatch, "azure.ai.contentsafety", ContentSafetyClient=lambda *a: client)
    fake_module(monkeypatch, "azure.core.credentials", AzureKeyCredential=lambda key: key)
    fake_module(monkeypatch, "azure.ai.contentsafety.models",
                AnalyzeTextOptions=lambda text, categories: types.SimpleNamespace(text=text),
                TextCategory=types.SimpleNamespace(VIOLENCE="Violence", SELF_HARM="SelfHarm",
                                                   SEXUAL="Sexual", HATE="Hate"))
    with pytest.raises(ConfigError, match="CONTENT_SAFETY_ENDPOINT and CONTENT_SAFETY_KEY"):
        build_checkers(azure=True)
    monkeypatch.setenv("CONTENT_SAFETY_ENDPOINT", "https://example.invalid")
    monkeypatch.setenv("CONTENT_SAFETY_KEY", "key")
    (checker,) = build_checkers(azure=True)
    verdict = checker(user("a prompt") + [{"role": "assistant", "content": "an answer"}])
    assert client.texts == ["an answer"]  # the last message is judged
    assert not verdict.safe and "Violence: 4" in verdict.report
    client.severities["Violence"] = 0
    assert checker(user("a prompt")).safe


def test_auditnlg_says_what_is_missing_and_judges_by_the_predicted_class(monkeypatch):
    if not installed("auditnlg"):
        with pytest.raises(ConfigError, match="pip install auditnlg"):
            inference.main("tiny-llama", prompt="Hi", use_auditnlg=True)  # their README's flag
    predicted = {"class": "none"}

    def safety_scores(data, method):
        assert method == "sensitive_topics"
        return None, {"all_scores": [{"pred_class": predicted["class"], "class_scores": [
            {"none": 0.1}, {"politics": 0.9}]}]}

    for package in ("auditnlg", "auditnlg.safety"):
        fake_module(monkeypatch, package)
    fake_module(monkeypatch, "auditnlg.safety.exam", safety_scores=safety_scores)
    checker = AuditNLGSensitiveTopics()
    assert checker(user("Hi")).safe
    predicted["class"] = "politics"
    verdict = checker(user("Hi"))
    assert not verdict.safe and "predicted class: politics" in verdict.report


def test_salesforce_checker_reads_its_classifiers_first_word(tmp_path, monkeypatch):
    """A tiny random T5 stands in for Salesforce/safety-flan-t5-base; what it answers is set."""
    tokenizer = AutoTokenizer.from_pretrained(BUILTIN_MODELS["tiny-llama"])
    T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    checker = SalesforceSafety(str(tmp_path))
    seen, reply = [], {"text": "safe"}

    def classifier(input_ids, **kwargs):
        seen.append(tokenizer.decode(input_ids[0], skip_special_tokens=True))
        return tokenizer(reply["text"], return_tensors="pt").input_ids

    monkeypatch.setattr(checker.model, "generate", classifier)
    assert checker(user("Hello there")).safe
    assert "<Text> Hello there <Context>" in seen[0]
    reply["text"] = "unsafe toxicity true hate false"
    verdict = checker(user("Hello there"))
    assert not verdict.safe and "toxicity true" in verdict.report
