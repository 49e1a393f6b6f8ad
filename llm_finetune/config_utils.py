"""Turn keyword arguments (from Python, the command line or a ``--config`` file) into the run's
dataclass configs, type-check every value, and refuse bad combinations before anything is loaded.

Keys follow llama-recipes: a plain key (``lr``, ``pure_bf16``) sets that field on every config
that has it; a dotted key (``fsdp_config.pure_bf16``, ``lora_config.r``) sets one config's field.
Unlike llama-recipes, an unknown key is an error, not a warning: a misspelt flag must not train.
"""

import dataclasses
import difflib
import enum
import json
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from llm_finetune.configs import (
    DATASET_CONFIGS,
    fsdp_config,
    llama_adapter_config,
    lora_config,
    prefix_config,
    quantization_config,
    train_config,
    wandb_config,
)
from llm_finetune.configs.recipes import RECIPES
from llm_finetune.errors import ConfigError  # noqa: F401 (where callers have always found it)


# what users of the transformers Trainer / TRL / axolotl type, and our name for it
OTHER_TOOLS_NAMES = {
    "learning_rate": "lr", "per_device_train_batch_size": "batch_size_training",
    "micro_batch_size": "batch_size_training", "per_device_eval_batch_size": "val_batch_size",
    "num_train_epochs": "num_epochs", "max_steps": "max_train_step",
    "max_seq_length": "context_length", "sequence_len": "context_length",
    "gradient_checkpointing": "fsdp_config.fsdp_activation_checkpointing",
    "lora_r": "lora_config.r", "lora_alpha": "lora_config.lora_alpha",
    "lora_dropout": "lora_config.lora_dropout", "load_in_4bit": "quantization",
    "bf16": "mixed_precision", "fp16": "use_fp16", "max_grad_norm": "gradient_clipping_threshold",
}


CHOICES = {
    "train_config.batching_strategy": ("padding", "packing"),
    "train_config.bad_rows": ("fail", "skip"),
    "train_config.lr_scheduler": ("step", "cosine", "linear", "constant"),
    "train_config.peft_method": ("lora", "llama_adapter", "prefix"),
    "train_config.quantization": ("", "4bit", "8bit"),
    "train_config.dataset": tuple(DATASET_CONFIGS),
    "train_config.method": ("sft", "dpo"),
    "train_config.dpo_loss": ("sigmoid", "ipo", "hinge"),
    "llama_guard_dataset.explanation_position": ("none", "before", "after"),
    "fsdp_config.sharding_strategy": ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"),
    "fsdp_config.checkpoint_type": ("SHARDED_STATE_DICT", "FULL_STATE_DICT"),
    "fsdp_config.backward_prefetch": ("BACKWARD_PRE", "BACKWARD_POST", "NONE"),
    "fsdp_config.optimizer": ("AdamW", "anyprecision"),
    "quantization_config.quant_type": ("nf4", "fp4"),
    "quantization_config.compute_dtype": ("bfloat16", "float16", "float32"),
    "quantization_config.quant_storage": ("", "bfloat16", "float16", "float32", "uint8"),
    "wandb_config.mode": ("", "online", "offline", "disabled"),
}


# llama-recipes' configs hold enums and torch dtypes, so its users type their printed names
# (``--fsdp_config.checkpoint_type StateDictType.FULL_STATE_DICT``); ours are the bare names
PRINTED_NAME_PREFIXES = {
    "fsdp_config.checkpoint_type": "StateDictType.",
    "fsdp_config.sharding_strategy": "ShardingStrategy.",
    "fsdp_config.backward_prefetch": "BackwardPrefetch.",
    "quantization_config.compute_dtype": "torch.",
    "quantization_config.quant_storage": "torch.",
}


@dataclass
class RunConfig:
    """Every config of one run. ``dataset`` is the config of the selected data set."""

    train: train_config
    fsdp: fsdp_config
    lora: lora_config
    llama_adapter: llama_adapter_config
    prefix: prefix_config
    quantization: quantization_config
    wandb: wandb_config
    datasets: dict
    # what the built-in model's recipe set, for the settings not given (configs/recipes.py)
    recipe: dict = dataclasses.field(default_factory=dict)
    # the settings the user gave (file or flags) or the built-in model's recipe set, as
    # config.field: what a GPU's fast defaults (plan/gpu_defaults.py) leave alone
    given: set = dataclasses.field(default_factory=set)

    @property
    def dataset(self):
        return self.datasets[self.train.dataset]

    @property
    def peft(self):
        return {"lora": self.lora, "llama_adapter": self.llama_adapter,
                "prefix": self.prefix}[self.train.peft_method]

    def all_configs(self) -> list:
        return [self.train, self.fsdp, self.lora, self.llama_adapter, self.prefix,
                self.quantization, self.wandb, *self.datasets.values()]

    def to_dict(self) -> dict:
        """A nested, JSON-serialisable view (written next to checkpoints and metrics)."""
        return {type(c).__name__: dataclasses.asdict(c) for c in self.all_configs()}


def default_run_config() -> RunConfig:
    return RunConfig(train_config(), fsdp_config(), lora_config(), llama_adapter_config(),
                     prefix_config(), quantization_config(), wandb_config(),
                     {name: cls() for name, cls in DATASET_CONFIGS.items()})


def load_config_file(path: str) -> dict:
    """Read a preset (YAML or JSON) into flat keys; nested mappings become dotted keys."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file. Presets ship in the repository's "
                          f"configs/ directory, e.g. --config configs/tiny_lora.yaml")
    text = file.read_text()
    if file.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def _coerce(qualified: str, annotation, value):
    """Check ``value`` against the field's type; convert only where the meaning is unambiguous
    (command lines deliver "1e-4" strings, comma lists, ints for floats)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):  # Optional[X]: accept None or X
        if value is None:
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)

    def bad(expected):
        return ConfigError(f"{qualified} expects {expected}, got {value!r} "
                           f"({type(value).__name__})")

    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad("true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad("an integer")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("a number")
    if annotation is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. --output_dir 123
        raise bad("a string")
    if origin is list or annotation is list:
        if value is None:  # unset, these fields' default (llama-recipes' wandb tags)
            return None
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return list(value)
        raise bad("a list of strings (e.g. q_proj,v_proj)")
    return value


def llama_recipes_value(qualified: str, value):
    """``value`` as llama-recipes' users give it, in our spelling: enum members and their
    printed names (``StateDictType.FULL_STATE_DICT``), torch dtypes (``torch.bfloat16``), and a
    bare ``--quantization`` (fire passes True), which llama-recipes still reads as 8-bit."""
    if qualified == "train_config.quantization" and isinstance(value, bool):
        if value:
            print("note: a bare --quantization means 8-bit, as in llama-recipes; say "
                  "--quantization 8bit (or 4bit)", file=sys.stderr, flush=True)
        return "8bit" if value else ""
    prefix = PRINTED_NAME_PREFIXES.get(qualified)
    if prefix is None:
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (str, torch.dtype)):
        return str(value).removeprefix(prefix)
    return value


def llama_recipes_only_key(key: str, value) -> bool:
    """Whether ``key`` is one of llama-recipes' settings that has no field here because it
    cannot change anything: True when its value asks for nothing; ConfigError when it asks
    for what cannot apply."""
    config_name, _, field_name = key.rpartition(".")
    if field_name == "dataset" and config_name in DATASET_CONFIGS:
        # llama-recipes' name of the data set a dataset config belongs to: its own
        if value != config_name:
            raise ConfigError(f"--{key} {value}: the data set is chosen by --dataset {value}")
        return True
    return False


def _field_types(config) -> dict:
    hints = typing.get_type_hints(type(config))
    return {f.name: hints[f.name] for f in fields(config)}


def _targets(run: RunConfig, key: str) -> tuple[list, str]:
    """(the configs a flat or dotted key sets, the field name): a plain key sets that field on
    every config that has it, a dotted key one config's field."""
    by_name = {type(c).__name__: c for c in run.all_configs()}
    if "." in key:
        config_name, _, field_name = key.partition(".")
        targets = [by_name[config_name]] if config_name in by_name else []
    else:
        field_name = key
        targets = list(by_name.values())
    return [c for c in targets if field_name in _field_types(c)], field_name


def update_run_config(run: RunConfig, overrides: dict) -> set[str]:
    """Apply flat and dotted keys to ``run``; unknown keys raise with the closest valid names.
    Returns the fields set, as ``config.field``."""
    by_name = {type(c).__name__: c for c in run.all_configs()}
    valid = sorted({f"{n}.{f}" for n, c in by_name.items() for f in _field_types(c)}
                   | {f for c in by_name.values() for f in _field_types(c)})
    unknown, given = [], set()
    for key, value in overrides.items():
        key = key.replace("-", "_")
        if llama_recipes_only_key(key, value):
            continue
        targets, field_name = _targets(run, key)
        if not targets:
            unknown.append(key)
            continue
        for config in targets:
            qualified = f"{type(config).__name__}.{field_name}"
            setattr(config, field_name, _coerce(qualified, _field_types(config)[field_name],
                                                llama_recipes_value(qualified, value)))
            given.add(qualified)
    if unknown:
        lines = []
        for key in unknown:
            names = {name: name for name in valid} | OTHER_TOOLS_NAMES
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
            close = list(dict.fromkeys(names[c] for c in close))
            hint = f" Did you mean {' or '.join('--' + c for c in close)}?" if close else ""
            lines.append(f"unknown setting --{key}.{hint}")
        raise ConfigError("\n".join(lines) + "\nSee `python -m llm_finetune.finetuning --help` "
                          "or docs/configuration.md for every setting.")
    return given


def build_run_config(**kwargs) -> RunConfig:
    """Defaults, then the ``config`` file if given, then keyword arguments, then the built-in
    model's recipe for the settings neither gave; validated."""
    run = default_run_config()
    config_file = kwargs.pop("config", None)
    from_file = load_config_file(config_file) if config_file else {}
    given = update_run_config(run, from_file)
    given |= update_run_config(run, kwargs)
    run.recipe = apply_recipe(run, given)
    run.given = given | {name for key in run.recipe for name in _qualified(run, key)}
    apply_hsdp(run.fsdp, strategy_given="fsdp_config.sharding_strategy" in given)
    apply_method_batching(run.train, strategy_given="train_config.batching_strategy" in given)
    check_choices(run)
    return run


def apply_method_batching(t: train_config, strategy_given: bool) -> None:
    """Packing is llama-recipes' default for supervised runs; ``--method dpo`` batches each
    chosen response beside its rejected one, padded, so it pads unless packing was asked for
    (which the preference checks then refuse, with the fix)."""
    if t.method == "dpo" and not strategy_given:
        t.batching_strategy = "padding"


def apply_hsdp(f: fsdp_config, strategy_given: bool) -> None:
    """``hsdp`` selects HYBRID_SHARD. llama-recipes ignores it unless the sharding strategy is
    HYBRID_SHARD too; here it is enough alone, and a different strategy given with it is a
    contradiction, refused rather than one of them silently ignored."""
    if not f.hsdp:
        return
    if strategy_given and f.sharding_strategy != "HYBRID_SHARD":
        raise ConfigError(f"--fsdp_config.hsdp asks for HYBRID_SHARD, but "
                          f"--fsdp_config.sharding_strategy is {f.sharding_strategy}: drop one")
    f.sharding_strategy = "HYBRID_SHARD"


def apply_recipe(run: RunConfig, given: set[str]) -> dict:
    """Set the built-in model's recipe (``configs/recipes.py``) on every setting not in
    ``given`` (``config.field`` names, as ``update_run_config`` returns them for a file and the
    flags); returns what was set. A model that is not built in has no recipe: the defaults
    (llama-recipes') stand."""
    recipe = RECIPES.get(run.train.model_name, {})
    applied = {key: value for key, value in recipe.items()
               if not _qualified(run, key) & given}
    update_run_config(run, applied)
    return applied


def _qualified(run: RunConfig, key: str) -> set[str]:
    """The ``config.field`` settings a flat or dotted key sets."""
    targets, field_name = _targets(run, key.replace("-", "_"))
    return {f"{type(c).__name__}.{field_name}" for c in targets}


def describe_recipe(run: RunConfig) -> str:
    """The console line that says which settings came from the model's recipe, not the
    defaults."""
    shown = ", ".join(f"{key}={value}" for key, value in run.recipe.items())
    return (f"{run.train.model_name}'s own recipe for the settings not given: {shown} "
            "(the defaults are llama-recipes'; any flag overrides the recipe)")


def check_choices(run: RunConfig) -> None:
    by_name = {type(c).__name__: c for c in run.all_configs()}
    for qualified, allowed in CHOICES.items():
        config_name, field_name = qualified.split(".")
        value = getattr(by_name[config_name], field_name)
        if value not in allowed:
            shown = ", ".join(repr(a) if a == "" else a for a in allowed)
            raise ConfigError(f"--{qualified}={value!r} is not one of: {shown}")


def field_help() -> str:
    """Every setting with its default, for ``--help``."""
    lines = []
    for config in default_run_config().all_configs():
        name = type(config).__name__
        lines.append(f"{name}:")
        for key, value in dataclasses.asdict(config).items():
            flag = key if name == "train_config" else f"{name}.{key}"
            lines.append(f"  --{flag}={value!r}")
    return "\n".join(lines)
