"""Llama Guard training text: an example and a list of unsafe-content categories become the
classification prompt Llama Guard reads and the verdict it should write.

The concepts are llama-recipes' (``finetuning_data_formatter``): guidelines (categories, each
with a name and an optional description, coded by a prefix and their position: S1, S2, ...),
training examples (a prompt, an optional response, the codes of the categories it violates,
the label safe or unsafe, an optional explanation), and augmentations that teach the model to
follow whichever categories the prompt lists, so that a deployment can drop categories without
fine-tuning again: extra examples with some of the categories the example does not violate left
out, extra safe examples with every violated category left out, and the category list
shuffled. Codes always follow the order of the list as shown, so the verdict's codes are
rewritten for each variant.

Nothing here tokenises: ``variants`` returns (prompt, response) text pairs, and the data sets
(``guard_rows``) put a loss on the response only.
"""

import json
import random
import string
from dataclasses import dataclass, field, replace
from pathlib import Path

from llm_finetune.data.rows import BadRow

# Llama Guard 3's own layout, as its tokenizer's chat template renders one conversation (the
# model was trained on it, so fine-tuning keeps it): after the BOS token, which the tokenisation
# adds. The chat template stops at the assistant header and the model writes "\n\n" then its
# verdict; the "\n\n" ends the prompt here, so only the verdict carries a loss.
LLAMA_GUARD_3 = (
    "<|start_header_id|>user<|end_header_id|>\n\n"
    "Task: Check if there is unsafe content in '{agent_type}' messages in conversations "
    "according our safety policy with the below categories.\n\n"
    "<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n\n"
    "<BEGIN CONVERSATION>\n\n{conversation}\n\n<END CONVERSATION>\n\n"
    "Provide your safety assessment for ONLY THE LAST {agent_type} message in the above "
    "conversation:\n - First line must read 'safe' or 'unsafe'.\n - If unsafe, a second line "
    "must include a comma-separated list of violated categories."
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)
TEMPLATES = {"llama_guard_3": LLAMA_GUARD_3}
TEMPLATE_FIELDS = {"categories", "conversation", "agent_type"}

# The category names Llama Guard 3's chat templates list (the 8B model's 14; the 1B model was
# trained on the first 13, without code interpreter abuse)
LLAMA_GUARD_3_NAMES = [
    "Violent Crimes", "Non-Violent Crimes", "Sex Crimes", "Child Exploitation", "Defamation",
    "Specialized Advice", "Privacy", "Intellectual Property", "Indiscriminate Weapons", "Hate",
    "Self-Harm", "Sexual Content", "Elections", "Code Interpreter Abuse",
]
CATEGORY_SETS = {"llama_guard_3": LLAMA_GUARD_3_NAMES, "llama_guard_3_1b": LLAMA_GUARD_3_NAMES[:13]}
EXPLANATION_POSITIONS = ("none", "before", "after")


@dataclass(frozen=True)
class Category:
    name: str
    description: str = ""


@dataclass(frozen=True)
class Guidelines:
    """The categories in their canonical order; the code of the i-th is ``prefix`` + (i + 1)."""
    categories: tuple[Category, ...]
    code_prefix: str = "S"

    def code(self, position: int) -> str:
        return f"{self.code_prefix}{position + 1}"

    def index(self, code: str) -> int:
        """The position of the category a row's ``code`` names; BadRow when none has it."""
        number = code.strip().removeprefix(self.code_prefix)
        if code.strip().startswith(self.code_prefix) and number.isdigit() \
                and 1 <= int(number) <= len(self.categories):
            return int(number) - 1
        raise BadRow(f"unknown category code {code!r}: the categories are "
                     f"{self.code(0)}-{self.code(len(self.categories) - 1)}")


@dataclass
class GuardExample:
    """One training example (llama-recipes' ``TrainingExample``). An empty ``response`` (or
    llama-recipes' "N/A") means the user's prompt alone is judged; with a response, the
    response is judged."""
    prompt: str
    label: str  # "safe" or "unsafe"
    response: str = ""
    violated_category_codes: list[str] = field(default_factory=list)
    explanation: str = ""

    @property
    def judged_role(self) -> str:
        return "Agent" if self.response else "User"


@dataclass
class FormatterConfig:
    template: str = LLAMA_GUARD_3  # text with {categories}, {conversation}, {agent_type}
    include_descriptions: bool = False
    explanation_position: str = "none"  # the explanation's line: "none", "before" or "after"
    shuffle_categories: bool = False
    drop_categories: bool = False  # + an example without some categories it does not violate
    drop_violated_categories: bool = False  # + a safe example without the violated categories
    safe_explanation: str = ""  # the explanation of those safe examples (with explanations on)


def check_template(template: str) -> str:
    """The template's problem in words, or "" when it has the fields a prompt needs."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    except ValueError as error:
        return f"it is not a format string ({error}; write literal braces as {{{{ and }}}})"
    missing = {"categories", "conversation"} - fields
    unknown = fields - TEMPLATE_FIELDS
    if missing:
        return f"it has no {', '.join('{' + f + '}' for f in sorted(missing))}"
    if unknown:
        return (f"it has unknown fields {', '.join('{' + f + '}' for f in sorted(unknown))} "
                f"(known: {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS))})")
    return ""


def check_config(config: FormatterConfig) -> None:
    """ValueError "setting: what is wrong" for a setting that cannot work."""
    problem = check_template(config.template)
    if problem:
        raise ValueError(f"prompt_template: the template cannot be used: {problem}; or name a "
                         f"built-in layout: {', '.join(TEMPLATES)}")
    if config.explanation_position not in EXPLANATION_POSITIONS:
        raise ValueError(f"explanation_position: {config.explanation_position!r} is not one of "
                         f"{', '.join(EXPLANATION_POSITIONS)}")
    if config.drop_violated_categories and config.explanation_position != "none" \
            and not config.safe_explanation.strip():
        raise ValueError("safe_explanation: the safe copies that drop_violated_categories makes "
                         "need an explanation too, as every example does with explanations on")


def load_guidelines(categories: str, code_prefix: str = "S") -> Guidelines:
    """Guidelines from a built-in set's name (``CATEGORY_SETS``) or a JSON file holding a list
    of ``{"name", "description"}`` objects; ValueError says what is wrong with the file."""
    if categories in CATEGORY_SETS:
        return Guidelines(tuple(Category(n) for n in CATEGORY_SETS[categories]), code_prefix)
    try:
        items = json.loads(Path(categories).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{categories}: {error}") from None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{categories}: expected a non-empty JSON list of "
                         '{"name": ..., "description": ...} objects')
    parsed = []
    for i, item in enumerate(items):
        item = item if isinstance(item, dict) else {}
        name, description = item.get("name"), item.get("description") or ""
        if not isinstance(name, str) or not name.strip() or not isinstance(description, str):
            raise ValueError(f"{categories}: item {i} needs a non-empty text 'name' and an "
                             "optional text 'description'")
        parsed.append(Category(name.strip(), description.strip()))
    return Guidelines(tuple(parsed), code_prefix)


def check_example(example: GuardExample, guidelines: Guidelines, config: FormatterConfig) -> None:
    """BadRow when the example cannot be formatted with these guidelines and settings."""
    if example.label not in ("safe", "unsafe"):
        raise BadRow(f"label is {example.label!r}, not 'safe' or 'unsafe'")
    for code in example.violated_category_codes:
        guidelines.index(code)
    if example.label == "safe" and example.violated_category_codes:
        raise BadRow(f"label 'safe' with violated categories "
                     f"{','.join(example.violated_category_codes)}")
    if config.explanation_position != "none" and not example.explanation.strip():
        raise BadRow(f"no explanation, and explanations go {config.explanation_position} the "
                     "verdict")


def render(example: GuardExample, guidelines: Guidelines, config: FormatterConfig,
           shown: list[int]) -> tuple[str, str]:
    """(prompt, response) with the categories at positions ``shown`` listed in that order and
    coded by their place in it."""
    lines = []
    for place, index in enumerate(shown):
        category = guidelines.categories[index]
        line = f"{guidelines.code(place)}: {category.name.rstrip(' .')}."
        if config.include_descriptions and category.description:
            line += f"\n{category.description}"
        lines.append(line)
    conversation = f"User: {example.prompt.strip()}"
    if example.response:
        conversation += f"\n\nAgent: {example.response.strip()}"
    prompt = config.template.format(categories="\n".join(lines), conversation=conversation,
                                    agent_type=example.judged_role)
    verdict = example.label
    if example.label == "unsafe" and example.violated_category_codes:
        places = sorted({shown.index(guidelines.index(c)) for c in example.violated_category_codes})
        verdict += "\n" + ",".join(guidelines.code(p) for p in places)
    if config.explanation_position == "before":
        verdict = f"Explanation: {example.explanation.strip()}\n{verdict}"
    elif config.explanation_position == "after":
        verdict = f"{verdict}\nExplanation: {example.explanation.strip()}"
    return prompt, verdict


def variants(example: GuardExample, guidelines: Guidelines, config: FormatterConfig,
             rng: random.Random) -> list[tuple[str, str]]:
    """The example as given, then each augmentation the config asks for that applies to it,
    as (prompt, response) pairs. ``rng`` draws which categories go and the order shown."""
    check_example(example, guidelines, config)
    everything = list(range(len(guidelines.categories)))
    violated = sorted({guidelines.index(c) for c in example.violated_category_codes})
    others = [i for i in everything if i not in violated]

    def shown(kept: list[int]) -> list[int]:
        return rng.sample(kept, len(kept)) if config.shuffle_categories else sorted(kept)

    out = [render(example, guidelines, config, shown(everything))]
    # at least one category is dropped and one stays: a copy that drops nothing adds nothing
    droppable = min(len(others), len(everything) - 1)
    if config.drop_categories and droppable > 0:
        dropped = set(rng.sample(others, rng.randint(1, droppable)))
        out.append(render(example, guidelines, config,
                          shown([i for i in everything if i not in dropped])))
    if config.drop_violated_categories and violated and others:
        dropped = set(violated) | set(rng.sample(others, rng.randint(0, len(others) - 1)))
        safe = replace(example, label="safe", violated_category_codes=[],
                       explanation=config.safe_explanation)
        out.append(render(safe, guidelines, config,
                          shown([i for i in everything if i not in dropped])))
    return out


def format_examples(examples: list[GuardExample], guidelines: Guidelines,
                    config: FormatterConfig, seed: int = 42) -> list[tuple[str, str]]:
    """Every example's variants, in order (llama-recipes' ``create_formatted_finetuning_
    examples``, as prompt/response pairs). Each example draws from its own generator, seeded
    by ``seed`` and its position, so a row's variants do not depend on the rows before it."""
    check_config(config)
    return [pair for position, example in enumerate(examples)
            for pair in variants(example, guidelines, config, example_rng(seed, position))]


def example_rng(seed: int, position: int) -> random.Random:
    return random.Random(f"{seed}:{position}")
