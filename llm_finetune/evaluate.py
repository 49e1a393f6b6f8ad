"""Score a fine-tuned model on benchmarks with EleutherAI's lm-evaluation-harness, and record the
scores beside the run's training metrics.

    python -m llm_finetune.evaluate --model_name output --tasks hellaswag,arc_easy
    python -m llm_finetune.evaluate --model_name BASE --peft_model output --tasks mmlu --num_fewshot 5
    python -m llm_finetune.evaluate --model_name output --tasks my_task --include_path my_tasks/

``--model_name`` may be a run's ``output_dir``: a PEFT run's adapter (its base read from the
``train_params.yaml`` beside it) or a full run's ``model/``. The model is loaded the way
``inference.load`` loads it (the adapter, the embedding grown to the tokenizer, the seeded base of
a config-only model) and handed to lm-eval's ``HFLM``, so the harness scores the model the run
produced rather than its own re-load of it. The scores are appended to the run's
``metrics.jsonl`` as one record at the step of the saved model, and drawn in its plots.
lm-eval is optional: ``pip install -e ".[eval]"``.
"""

import difflib
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import fire
import yaml

from llm_finetune.errors import ConfigError
from llm_finetune.export import TRAIN_PARAMS
from llm_finetune.inference import load
from llm_finetune.metrics import append_record, read_records
from llm_finetune.model import BUILTIN_MODELS, name_has_weights
from llm_finetune.output_dir import check_writable
from llm_finetune.plot import plot

LM_EVAL = "lm_eval>=0.4.13,<0.5"
ADAPTER_CONFIG = "adapter_config.json"
HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?")  # "gpt2", "meta-llama/Llama-3.1-8B"


@dataclass
class Target:
    """What to load, and the run that produced it (its scores are recorded there)."""
    model_name: str
    peft_model: str
    run_dir: Path | None


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("evaluation runs EleutherAI's lm-evaluation-harness, which is not "
                          f'installed: pip install -e ".[eval]" (or pip install "{LM_EVAL}")')


def check_exists(name: str, what: str, hint: str = "") -> None:
    """A name that can only be a local path (not a built-in model, nor a hub name whose first
    part is no local directory) must exist: said at once, not after the hub's retries."""
    path = Path(name)
    if name in BUILTIN_MODELS or path.exists():
        return
    if HUB_NAME.fullmatch(name) and not (path.parent != Path(".") and path.parent.is_dir()):
        return  # a hub name: from_pretrained says if it is not there
    raise ConfigError(f"{what} {name}: no such directory{hint}")


def run_of(directory: Path) -> Path | None:
    return directory if (directory / "metrics.jsonl").is_file() else None


def base_of_adapter(adapter_dir: Path) -> str:
    """The base an adapter was trained on: our runs' ``train_params.yaml``, else peft's record."""
    params = adapter_dir / TRAIN_PARAMS
    if params.is_file():
        return yaml.safe_load(params.read_text())["model_name"]
    recorded = json.loads((adapter_dir / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not recorded:
        raise ConfigError(f"{adapter_dir} is an adapter that does not say which base it was "
                          "trained on: give the base as --model_name and the adapter as "
                          "--peft_model")
    return recorded


def locate(model_name: str, peft_model: str) -> Target:
    """What ``--model_name``/``--peft_model`` point at, checked before anything is loaded. A run's
    output_dir stands for its model: the adapter in it, or its ``model/`` (``export.model_dir``)."""
    check_exists(model_name, "--model_name")
    directory = Path(model_name)
    if peft_model:
        if not (Path(peft_model) / ADAPTER_CONFIG).is_file():
            raise ConfigError(f"--peft_model {peft_model}: no {ADAPTER_CONFIG} there (give the "
                              "output_dir of a run with --use_peft)")
        return Target(model_name, peft_model, run_of(Path(peft_model)))
    if (directory / ADAPTER_CONFIG).is_file():
        base = base_of_adapter(directory)
        check_exists(base, f"the base model of {model_name}, from its {TRAIN_PARAMS},",
                     f" (give the base as --model_name, with --peft_model {model_name})")
        return Target(base, model_name, run_of(directory))
    if (directory / "model" / "config.json").is_file():
        return Target(str(directory / "model"), "", run_of(directory))
    if (directory / ".metadata").is_file():
        raise ConfigError(f"{model_name} is a sharded (DCP) checkpoint: make it a Hugging Face "
                          "directory first, python -m llm_finetune.convert dcp_to_hf")
    if not name_has_weights(model_name):
        raise ConfigError(f"--model_name {model_name} has no weights (a config that a run "
                          "initialises randomly): evaluate a run's output_dir, or give the "
                          "adapter trained on it as --peft_model")
    run_dir = run_of(directory.parent) if directory.name == "model" else None
    return Target(model_name, "", run_dir)


def comma_list(value) -> list[str]:
    """``--tasks a,b`` (fire hands a tuple) or ``--tasks a``."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def unknown_tasks(manager, tasks: list[str]) -> list[str]:
    return [t for t in tasks if not Path(t).is_file() and not manager.match_tasks([t])]


def task_manager(tasks: list[str], include_path: list[str]):
    """lm-eval's TaskManager, knowing every task asked for, or a ``ConfigError`` naming the
    unknown ones and their closest names. Local tasks are looked up first, alone: indexing
    lm-eval's own 14,000 task files takes seconds that a local task does not need."""
    from lm_eval.tasks import TaskManager

    for path in include_path:
        if not Path(path).is_dir():
            raise ConfigError(f"--include_path {path}: no such directory")
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        found = [local.match_tasks([t]) for t in tasks]
        # groups are left to the full index: a local group may name lm-eval's own tasks
        if all(names and set(names) <= set(local.all_subtasks) for names in found):
            return local
    manager = TaskManager(include_path=include_path or None)
    unknown = unknown_tasks(manager, tasks)
    if unknown:
        hints = [f"{name} (close: {', '.join(close)})" if close else name
                 for name in unknown
                 for close in [difflib.get_close_matches(name, manager.all_tasks, n=5)]]
        raise ConfigError(f"unknown lm-eval task {'; '.join(hints)}. `lm-eval ls tasks` lists "
                          "them; a task of your own: its YAML's directory in --include_path")
    return manager


def expand(manager, tasks: list[str]) -> list[str]:
    """Task names with globs expanded (``mmlu_*``); YAML file paths as given."""
    return [name for t in tasks
            for name in ([t] if Path(t).is_file() else manager.match_tasks([t]))]


def saved_model_step(run_dir: Path) -> dict:
    """The step and epoch of the model a run saved: the best epoch's when it kept the best
    (``export.ModelSaver``, the first of equal eval losses), otherwise its last step."""
    records = read_records(run_dir / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    config_file = run_dir / "run_config.json"
    train = json.loads(config_file.read_text())["train_config"] if config_file.is_file() else {}
    if train.get("save_best") and train.get("run_validation") and evals:
        step = min(evals, key=lambda r: r["eval_loss"])["step"]
    else:
        step = steps[-1]["step"] if steps else 0
    epoch = next((r["epoch"] for r in reversed(steps) if r["step"] <= step), 0)
    return {"step": step, "epoch": epoch}


def score_record(results: dict, tasks: list[str]) -> dict:
    """lm-eval's results as one metrics.jsonl record: ``scores`` and ``stderr`` keyed
    ``task/metric`` (``,filter`` kept where a task has several, as in ``gsm8k``), ``samples``
    (documents scored per task), and the settings."""
    scores, stderr = {}, {}
    for task, row in results["results"].items():
        for key, value in row.items():
            metric, comma, where = key.partition(",")
            if not comma or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # the alias, sample_len, the "N/A" stderr of metrics without one
            name = f"{task}/{metric.removesuffix('_stderr')}" + (
                f",{where}" if where and where != "none" else "")
            (stderr if metric.endswith("_stderr") else scores)[name] = value
    config = results.get("config", {})
    return {"tasks": tasks, "scores": scores, "stderr": stderr,
            "samples": {task: n["effective"] for task, n in results.get("n-samples", {}).items()},
            "num_fewshot": results.get("n-shot", {}), "limit": config.get("limit"),
            "lm_eval": results.get("lm_eval_version", "")}


def score(model, tokenizer, tasks: list[str], manager, num_fewshot, batch_size, limit) -> dict:
    """lm-eval's own evaluation of the loaded model (not a re-implementation of it); prints its
    table of scores."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import make_table

    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=False)
    print(make_table(results), flush=True)
    return results


def main(model_name: str, tasks: str, peft_model: str = "", num_fewshot: int | None = None,
         batch_size: int | str = 8, limit: float | None = None, include_path: str = "",
         output_dir: str = "", device: str = "") -> dict:
    """Evaluate ``model_name`` (with ``peft_model``) on ``tasks`` (comma list of lm-eval task
    names, globs, or YAML files; ``include_path``: directories of your own task YAMLs, comma
    list). ``num_fewshot``: examples in each prompt (default: each task's own); ``limit``: at most
    that many documents per task (below 1: that fraction), for a quick look; ``batch_size`` an
    integer or "auto". ``output_dir``: the run whose metrics.jsonl gets the scores (default: the
    run the model came from, if any). Returns the record (written when there is a run)."""
    require_lm_eval()
    target = locate(model_name, peft_model)
    record_dir = Path(output_dir) if output_dir else target.run_dir
    if record_dir is not None:
        check_writable(str(record_dir))
    manager = task_manager(comma_list(tasks), comma_list(include_path))
    names = expand(manager, comma_list(tasks))
    model, tokenizer = load(target.model_name, target.peft_model, device=device)
    results = score(model, tokenizer, names, manager, num_fewshot, batch_size, limit)
    # the model's place on the run's curves: its saved step when it is this run's own model,
    # otherwise (its base, say) step 0, before training
    own = target.run_dir is not None and record_dir is not None and \
        record_dir.resolve() == target.run_dir.resolve()
    at = saved_model_step(target.run_dir) if own else {"step": 0, "epoch": 0}
    record = {**at, **score_record(results, names), "model": target.model_name,
              "peft_model": target.peft_model}
    if record_dir is None:
        print("scores not recorded: the model is not in a run's output_dir (give --output_dir)",
              flush=True)
        return record
    record_dir.mkdir(parents=True, exist_ok=True)
    append_record(record_dir / "metrics.jsonl", record)
    print(f"scores appended to {record_dir / 'metrics.jsonl'} at step {record['step']}",
          flush=True)
    if (record_dir / "plots").is_dir():  # the run draws plots (matplotlib, --plot_metrics)
        plot(str(record_dir))
        print(f"plots redrawn in {record_dir / 'plots'}", flush=True)
    return record


if __name__ == "__main__":
    try:
        fire.Fire(main, serialize=lambda record: None)  # printed as a table; the record is on disk
    except ConfigError as error:  # a missing package, path or task: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
