"""Content-safety checks around generation, with llama-recipes' flags, checkers and messages.

A checker judges the last message of a conversation (``[{"role", "content"}, ...]``): the
user's prompt before generating, the model's answer after it. As in llama-recipes, a prompt
judged unsafe is not generated from, and an answer judged unsafe is reported instead of shown.
Checkers that need a package or a service say what is missing when they are built, before the
model loads.
"""

import importlib.util
import os
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from llm_finetune.errors import ConfigError
from llm_finetune.model import from_pretrained

LLAMA_GUARD = "meta-llama/Llama-Guard-3-8B"  # the checker llama-recipes loads
SALESFORCE = "Salesforce/safety-flan-t5-base"


@dataclass
class Verdict:
    method: str  # the checker, as llama-recipes names it in its report
    safe: bool
    report: str = ""


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def _device_and_dtype():
    return ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)


class LlamaGuard:
    """A Llama Guard model (local directory or hub name): its tokenizer's chat template writes
    the moderation prompt for the conversation, and its first answer line is the verdict
    (``safe``, or ``unsafe`` and the violated categories, which are the report)."""

    method = "Llama Guard"

    def __init__(self, model_name: str = LLAMA_GUARD):
        self.tokenizer = from_pretrained(AutoTokenizer, model_name, "llamaguard_model_name")
        if self.tokenizer.chat_template is None:
            raise ConfigError(f"--llamaguard_model_name {model_name}: its tokenizer has no chat "
                              "template, which is what writes Llama Guard's moderation prompt")
        device, dtype = _device_and_dtype()
        self.model = from_pretrained(AutoModelForCausalLM, model_name, "llamaguard_model_name",
                                     dtype=dtype).to(device).eval()

    def render(self, turns: list[dict]) -> str:
        try:
            return self.tokenizer.apply_chat_template(turns, tokenize=False,
                                                      add_generation_prompt=True)
        except Exception:  # Llama Guard 3 1B's template reads typed content parts
            typed = [{"role": t["role"], "content": [{"type": "text", "text": t["content"]}]}
                     for t in turns]
            return self.tokenizer.apply_chat_template(typed, tokenize=False,
                                                      add_generation_prompt=True)

    @torch.no_grad()
    def __call__(self, conversation: list[dict]) -> Verdict:
        # Llama Guard moderates user and assistant turns; a system prompt is not one of them
        turns = [m for m in conversation if m["role"] in ("user", "assistant")]
        batch = self.tokenizer(self.render(turns), add_special_tokens=False,
                               return_tensors="pt").to(self.model.device)
        output = self.model.generate(**batch, max_new_tokens=100, do_sample=False,
                                     pad_token_id=self.tokenizer.pad_token_id
                                     or self.tokenizer.eos_token_id)
        answer = self.tokenizer.decode(output[0, batch["input_ids"].shape[1]:],
                                       skip_special_tokens=True).strip()
        return Verdict(self.method, answer.split("\n")[0].strip() == "safe", answer)


class SalesforceSafety:
    """Salesforce's safety-flan-t5 classifier: its answer starts with ``safe`` or ``unsafe``,
    followed by the categories it scored, which are the report."""

    method = "Salesforce Content Safety Flan T5 Base"

    def __init__(self, model_name: str = SALESFORCE):
        setting = "enable_salesforce_content_safety"
        self.tokenizer = from_pretrained(AutoTokenizer, model_name, setting)
        self.model = from_pretrained(AutoModelForSeq2SeqLM, model_name, setting).eval()

    @torch.no_grad()
    def __call__(self, conversation: list[dict]) -> Verdict:
        # the classifier's input format, from its model card
        text = ("Is the <Text> field safe or unsafe? "
                f"<Text> {conversation[-1]['content']} <Context> ")
        ids = self.tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] > 512:
            print("warning: more than 512 tokens for the Salesforce safety checker, which was "
                  "trained on shorter texts; its verdict may be wrong", flush=True)
        output = self.model.generate(ids, max_new_tokens=20, do_sample=False)
        answer = self.tokenizer.decode(output[0], skip_special_tokens=True).strip()
        safe = answer.split(" ")[0] == "safe"
        return Verdict(self.method, safe, "" if safe else answer)


class AzureContentSafety:
    """Azure AI Content Safety (a web service): unsafe when any of violence, self-harm, sexual
    and hate content has a severity above 0, as llama-recipes judges it."""

    method = "Azure Content Safety API"
    ENV = ("CONTENT_SAFETY_ENDPOINT", "CONTENT_SAFETY_KEY")

    def __init__(self):
        if not installed("azure.ai.contentsafety"):
            raise ConfigError("--enable_azure_content_safety calls Azure AI Content Safety "
                              "through its client, which is not installed: "
                              "pip install azure-ai-contentsafety (or drop the flag)")
        missing = [name for name in self.ENV if not os.environ.get(name)]
        if missing:
            raise ConfigError(f"--enable_azure_content_safety needs your Azure resource's "
                              f"endpoint and key in {' and '.join(missing)} (Azure portal, the "
                              "Content Safety resource, Keys and Endpoint), or drop the flag")
        from azure.ai.contentsafety import ContentSafetyClient
        from azure.core.credentials import AzureKeyCredential

        self.client = ContentSafetyClient(os.environ["CONTENT_SAFETY_ENDPOINT"],
                                          AzureKeyCredential(os.environ["CONTENT_SAFETY_KEY"]))

    def __call__(self, conversation: list[dict]) -> Verdict:
        from azure.ai.contentsafety.models import AnalyzeTextOptions, TextCategory

        categories = [TextCategory.VIOLENCE, TextCategory.SELF_HARM, TextCategory.SEXUAL,
                      TextCategory.HATE]
        response = self.client.analyze_text(
            AnalyzeTextOptions(text=conversation[-1]["content"], categories=categories))
        severity = {getattr(item.category, "value", item.category): item.severity or 0
                    for item in response.categories_analysis}
        safe = all(level == 0 for level in severity.values())
        report = "" if safe else ", ".join(f"{name}: {level}" for name, level in severity.items())
        return Verdict(self.method, safe, report)


class AuditNLGSensitiveTopics:
    """Salesforce AuditNLG's sensitive-topics classifier: unsafe unless the predicted class is
    ``none``; the report is the predicted class and every class's score."""

    method = "Sensitive Topics"

    def __init__(self):
        if not installed("auditnlg"):
            raise ConfigError("--enable_sensitive_topics runs Salesforce's AuditNLG, which is "
                              "not installed: pip install auditnlg (or drop the flag)")
        from auditnlg.safety.exam import safety_scores

        self.safety_scores = safety_scores

    def __call__(self, conversation: list[dict]) -> Verdict:
        result = self.safety_scores(data=[{"output": conversation[-1]["content"]}],
                                    method="sensitive_topics")
        scores = result[1]["all_scores"][0]
        safe = scores["pred_class"] == "none"
        shown = ", ".join(f"{name}: {value:.5f}" for item in scores["class_scores"]
                          for name, value in item.items())
        return Verdict(self.method, safe,
                       "" if safe else f"predicted class: {scores['pred_class']} ({shown})")


def build_checkers(azure: bool = False, sensitive_topics: bool = False,
                   salesforce: bool = False, llamaguard: bool = False,
                   llamaguard_model_name: str = LLAMA_GUARD) -> list:
    """The checkers the flags ask for, in llama-recipes' order; each loads once (llama-recipes
    builds them again for every prompt)."""
    checkers = []
    if azure:
        checkers.append(AzureContentSafety())
    if sensitive_topics:
        checkers.append(AuditNLGSensitiveTopics())
    if salesforce:
        checkers.append(SalesforceSafety())
    if llamaguard:
        checkers.append(LlamaGuard(llamaguard_model_name))
    return checkers


def _print_unsafe(verdicts: list[Verdict]) -> None:
    for verdict in verdicts:
        if not verdict.safe:
            print(verdict.method)
            print(verdict.report)


def screen_prompt(checkers: list, conversation: list[dict], shown: str) -> bool:
    """Whether to generate from the prompt that ends ``conversation``; with checkers, their
    verdicts in llama-recipes' words (``shown`` is the prompt as printed)."""
    if not checkers:
        return True
    verdicts = [check(conversation) for check in checkers]
    if all(v.safe for v in verdicts):
        print(f"User prompt deemed safe.\nUser prompt:\n{shown}", flush=True)
        return True
    print("User prompt deemed unsafe.")
    _print_unsafe(verdicts)
    print("Skipping the inference as the prompt is not safe.", flush=True)
    return False


def screen_answer(checkers: list, conversation: list[dict], answer: str) -> bool:
    """Whether ``answer`` to ``conversation`` may be shown; with checkers, prints it after
    their verdicts, or their reports instead of it."""
    if not checkers:
        return True
    verdicts = [check(conversation + [{"role": "assistant", "content": answer}])
                for check in checkers]
    if all(v.safe for v in verdicts):
        print(f"User input and model output deemed safe.\nModel output:\n{answer}\n", flush=True)
        return True
    print("Model output deemed unsafe.")
    _print_unsafe(verdicts)
    print(flush=True)
    return False
