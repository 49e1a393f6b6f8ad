"""Docs do not rot: every `python -m llm_finetune...` / `torchrun ... -m llm_finetune...` command
in README.md, docs/ and examples/ names settings that exist, with values of the right type.

Commands on real models cannot run here (no downloads), so each is checked the way the program
itself would read it before loading anything: finetuning and plan settings through
``build_run_config`` (unknown keys, types, choices; a ``--config`` preset of this repository is
read too), convert, inference, chat_completion, evaluate, plot and memory_peak flags against
their functions' parameters (and the quantization settings inference reads as llama-recipes
does). The commands that do run on CPU are run by the tests of their features (README's two
commands by CI itself).
"""

import inspect
import re
import shlex
from pathlib import Path

import pytest

from llm_finetune import chat_completion, convert, evaluate, inference, memory_peak, plot
from llm_finetune.config_utils import build_run_config
from tests.helpers import REPO, parse_flags

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "examples").rglob("*.md"))]


def shell_commands(path: Path) -> list[str]:
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", path.read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if "llm_finetune." in line and not line.startswith("#"):
                commands.append(line)
    return commands


COMMANDS = [(path.relative_to(REPO).as_posix(), command)
            for path in DOCS for command in shell_commands(path)]


def test_the_docs_have_commands_to_check():
    modules = {re.search(r"llm_finetune\.(\w+)", c).group(1) for _, c in COMMANDS}
    assert {"finetuning", "plan", "convert", "inference", "chat_completion", "evaluate",
            "plot"} <= modules


@pytest.mark.parametrize("where,command", COMMANDS)
def test_documented_command_uses_real_settings(where, command):
    check_command(where, command)


@pytest.mark.parametrize("command", [
    "python -m llm_finetune.finetuning --lerning_rate 1e-4",
    "torchrun --nproc_per_node 2 -m llm_finetune.finetuning --fsdp_config.sharding_strategy ZERO3",
    "python -m llm_finetune.plan --model_name llama3-8b --num_epochs three",
    "python -m llm_finetune.convert dcp_to_hf --checkpoint c --model_name m --out o",
    "python -m llm_finetune.inference --model_name m --prompt_file p.txt --temprature 0.5",
    "python -m llm_finetune.chat_completion --model_name m --quantization_config.quant_type q4",
    "python -m llm_finetune.evaluate --model_name output --task hellaswag",
    "python -m llm_finetune.memory_peak rank0.pickle --top_places 5",
])
def test_the_check_catches_a_rotten_command(command):
    with pytest.raises(Exception):
        check_command("test", command)


def check_command(where: str, command: str) -> None:
    tokens = shlex.split(command)
    module_at = next(i for i, t in enumerate(tokens) if t.startswith("llm_finetune."))
    module = tokens[module_at].split(".", 1)[1]
    positional, flags = parse_flags(tokens[module_at + 1:])
    if module in ("finetuning", "plan"):
        if module == "plan":
            flags.pop("world_size", None)
            flags.pop("gpu_memory", None)
        for flag in ("help", "h", "help_settings"):  # print the usage, not settings
            flags.pop(flag, None)
        preset = flags.get("config")
        if preset and not (REPO / preset).is_file():
            flags.pop("config")  # a user's own file (my_run.yaml)
        elif preset:
            flags["config"] = str(REPO / preset)
        build_run_config(**flags)  # raises on an unknown key, a bad type or choice
    elif module == "convert":
        assert positional, f"{where}: convert needs a command"
        function = getattr(convert, positional[0])
        assert set(flags) <= set(inspect.signature(function).parameters), (where, command)
    elif module in ("inference", "chat_completion"):
        main = chat_completion.main if module == "chat_completion" else inference.main
        named = set(inspect.signature(main).parameters)
        extra = {k: v for k, v in flags.items() if k not in named}
        inference.quantization_settings(extra, known=sorted(named))  # raises on anything else
    elif module == "evaluate":
        assert set(flags) <= set(inspect.signature(evaluate.main).parameters), (where, command)
    elif module == "memory_peak":
        try:
            memory_peak.command_line().parse_args(tokens[module_at + 1:])
        except SystemExit as error:  # argparse's way to refuse a flag
            raise ValueError(f"{where}: {command}") from error
    elif module == "plot":
        assert positional and set(flags) <= set(inspect.signature(plot.plot).parameters)
    else:
        pytest.fail(f"{where}: unknown module llm_finetune.{module}")
