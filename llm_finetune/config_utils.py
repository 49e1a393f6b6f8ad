"""Turn keyword arguments (from Python, the command line or a ``--config`` file) into the run's
dataclass configs, type-check every value, and refuse bad combinations before anything is loaded.

Keys follow llama-recipes: a plain key (``lr``, ``pure_bf16``) sets that field on every config
that has it; a dotted key (``fsdp_config.pure_bf16``, ``lora_config.r``) sets one config's field.
Unlike llama-recipes, an unknown key is an error, not a warning: a misspelt flag must not train.
"""

import dataclasses
import difflib
import enum
import importlib.util
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from llm_finetune.checkpoint_files import CheckpointError, choose_checkpoint, read_manifest
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
from llm_finetune.data.batching import global_batch_problem
from llm_finetune.data.read import BUILDERS
from llm_finetune.errors import ConfigError  # noqa: F401 (where callers have always found it)
from llm_finetune.model import weights_on_disk
from llm_finetune.precision import choose_precision


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

FREEZE_LLM_ONLY = (
    "--freeze_LLM_only freezes a vision model's language model to train its image encoder, "
    "projector and cross-attention layers (llama-recipes' Mllama recipe); a causal LM has no "
    "vision parts, and vision models are not supported here yet (issue #18). "
    "Drop it; --freeze_layers --num_freeze_layers N freezes a causal LM's first N layers")


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
    if field_name == "freeze_LLM_only" and config_name in ("", "train_config"):
        if _coerce("train_config.freeze_LLM_only", bool, value):
            raise ConfigError(FREEZE_LLM_ONLY)
        return True
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


def validate(run: RunConfig, world_size: int, cuda: bool) -> None:
    """Refuse combinations that cannot work, before any model or data is loaded."""
    t, f = run.train, run.fsdp
    positive = {"batch_size_training": t.batch_size_training, "val_batch_size": t.val_batch_size,
                "gradient_accumulation_steps": t.gradient_accumulation_steps,
                "num_epochs": t.num_epochs, "context_length": t.context_length}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}")
    for flag, package in (("use_tensorboard", "tensorboard"), ("use_wandb", "wandb")):
        if getattr(t, flag) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"--{flag} needs the {package} package, which is not installed: "
                              f"pip install {package} (or drop --{flag})")
    if t.flop_counter and t.use_profiler:
        raise ConfigError("--flop_counter and --use_profiler at once would count the profiler's "
                          "own work: use one of them per run")
    if 0 < t.max_train_step < t.gradient_accumulation_steps:
        raise ConfigError(f"--max_train_step {t.max_train_step} counts micro-batches (as in "
                          f"llama-recipes), fewer than one optimizer step of "
                          f"--gradient_accumulation_steps {t.gradient_accumulation_steps}: the run "
                          f"would not train. Give at least {t.gradient_accumulation_steps}")
    if t.max_train_step < 0 or t.max_eval_step < 0:
        raise ConfigError("--max_train_step and --max_eval_step must be 0 (no limit) or positive")
    if t.save_steps < 0 or t.save_total_limit < 0:
        raise ConfigError("--save_steps and --save_total_limit must be 0 (off) or positive")
    try:  # the checkpoint the run will resume from, checked against its manifest
        checkpoint = choose_checkpoint(t.resume_from_checkpoint, t.output_dir)
    except CheckpointError as error:
        raise ConfigError(str(error)) from error
    if checkpoint:
        saved = read_manifest(checkpoint).get("global_batch")
        problem = saved and global_batch_problem(saved, t.batch_size_training, world_size,
                                                 t.gradient_accumulation_steps)
        if problem:
            raise ConfigError(f"{checkpoint} was {problem}")
    if f.no_checkpoint_layers < 0:
        raise ConfigError(f"--fsdp_config.no_checkpoint_layers must be 0 or more, got "
                          f"{f.no_checkpoint_layers}")
    if f.no_checkpoint_layers and not f.fsdp_activation_checkpointing:
        raise ConfigError("--fsdp_config.no_checkpoint_layers chooses layers to leave out of "
                          "activation checkpointing, which is off: drop it, or turn "
                          "--fsdp_config.fsdp_activation_checkpointing on")
    if t.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {t.lr}")
    if world_size > 1 and not (t.enable_fsdp or t.enable_ddp):
        raise ConfigError(f"launched on {world_size} ranks without --enable_fsdp or --enable_ddp: "
                          "every rank would train its own copy. Add --enable_fsdp (sharded), "
                          "--enable_ddp (a full replica per rank), or run one process.")
    if t.enable_fsdp and t.enable_ddp:
        raise ConfigError("--enable_fsdp and --enable_ddp are two ways to train data parallel: "
                          "pick one (FSDP shards the model, DDP replicates it)")
    if t.low_cpu_fsdp and not t.enable_fsdp:
        raise ConfigError("--low_cpu_fsdp loads weights on rank 0 and lets FSDP share them; it "
                          "needs --enable_fsdp")
    if (t.use_fp16 or f.use_fp16) and f.pure_bf16:
        raise ConfigError("--use_fp16 and --fsdp_config.pure_bf16 ask for two precisions: "
                          "pick one (bf16 is the safer choice on GPUs that support it)")
    if (t.use_fp16 or f.use_fp16) and not cuda:
        raise ConfigError("--use_fp16 needs a CUDA GPU; on CPU drop it (training runs in fp32)")
    if f.fsdp_cpu_offload and not cuda:
        raise ConfigError("--fsdp_config.fsdp_cpu_offload moves parameters from GPU to CPU "
                          "memory; without a GPU there is nothing to offload: drop it")
    if t.enable_fsdp and f.sharding_strategy == "HYBRID_SHARD":
        shard, replica = hybrid_mesh_shape(f, world_size)
        if shard * replica != world_size:
            raise ConfigError(
                f"HYBRID_SHARD with sharding_group_size={shard} and replica_group_size={replica} "
                f"needs {shard * replica} ranks, but {world_size} were launched. Set "
                f"--fsdp_config.sharding_group_size to the GPUs per node and "
                f"--fsdp_config.replica_group_size to the number of nodes.")
    if f.optimizer == "anyprecision" and \
            choose_precision(run, cuda).trainable_dtype != torch.bfloat16:
        raise ConfigError("--fsdp_config.optimizer anyprecision makes up for what updates to "
                          "bf16 weights lose to rounding, and these weights are fp32, where "
                          "AdamW loses nothing (llama-recipes then silently uses AdamW): add "
                          "--fsdp_config.pure_bf16 True, or drop the optimizer setting")
    if t.from_peft_checkpoint and not t.use_peft:
        raise ConfigError("--from_peft_checkpoint continues training saved adapters: add --use_peft")
    if t.from_peft_checkpoint and not Path(t.from_peft_checkpoint).is_dir():
        raise ConfigError(f"--from_peft_checkpoint {t.from_peft_checkpoint}: no such directory")
    if t.freeze_layers and t.use_peft:
        raise ConfigError("--freeze_layers is for full fine-tuning; with --use_peft only the "
                          "adapters train already. Drop one of them.")
    if t.quantization and not t.use_peft:
        raise ConfigError(f"--quantization {t.quantization} freezes the base weights in a form "
                          "that cannot be trained: add --use_peft (QLoRA)")
    if t.quantization == "8bit" and t.enable_fsdp:
        raise ConfigError("8-bit bitsandbytes weights cannot be sharded by FSDP (their row "
                          "statistics live outside the weight tensor). Use --enable_ddp (a full "
                          "8-bit replica per rank), --quantization 4bit with --enable_fsdp, or "
                          "LoRA on bf16 weights with --enable_fsdp --fsdp_config.pure_bf16 True")
    if t.quantization == "8bit":
        if not weights_on_disk(t):
            raise ConfigError(f"--quantization 8bit quantises weights as they load, and "
                              f"{t.model_name} has none on disk (a config-only model): use "
                              "--quantization 4bit, which random-init models support")
    if t.one_gpu and world_size > 1:
        raise ConfigError(f"--one_gpu asks for a single-process run, but {world_size} ranks "
                          "were launched: drop --one_gpu or launch one process")
    if t.quantization and t.use_peft and t.peft_method != "lora":
        raise ConfigError(f"--quantization works with --peft_method lora only (got {t.peft_method})")
    if t.use_peft and t.peft_method == "prefix" and f.fsdp_activation_checkpointing:
        raise ConfigError("prefix tuning feeds its virtual tokens to the model as a KV cache, "
                          "which transformers drops in checkpointed layers (the attention mask "
                          "then no longer matches). Add --fsdp_config.fsdp_activation_checkpointing "
                          "False, or use --peft_method lora")
    if t.use_peft and t.peft_method == "prefix" and t.batching_strategy == "packing":
        raise ConfigError("prefix tuning with --batching_strategy packing would let packed "
                          "samples attend to each other: the virtual tokens arrive as a KV cache, "
                          "and transformers builds the samples-apart mask only without one. Use "
                          "--batching_strategy padding, or --peft_method lora")
    check_data_files(run)
    check_preference_settings(run)
    if t.dataset == "file_dataset" and not run.dataset.data_files:
        raise ConfigError("--dataset file_dataset needs --file_dataset.data_files PATH[,PATH...]")
    if t.dataset == "custom_dataset" and not run.dataset.file:
        raise ConfigError("--dataset custom_dataset needs --custom_dataset.file "
                          "path/to/file.py[:function]")


def check_preference_settings(run: RunConfig) -> None:
    """``--method dpo``: what its data, reference model and batching need."""
    t = run.train
    if t.method != "dpo":
        return
    if t.dpo_beta <= 0:
        raise ConfigError(f"--dpo_beta must be positive, got {t.dpo_beta}")
    if t.dataset != "file_dataset":
        raise ConfigError(f"--method dpo trains on preference pairs, which --dataset {t.dataset} "
                          "does not have: use --dataset file_dataset --file_dataset.data_files "
                          "prefs.jsonl, rows of prompt, chosen and rejected (docs/preference.md)")
    if t.batching_strategy == "packing":
        raise ConfigError("--method dpo compares each chosen response with its rejected one, "
                          "rows of one padded batch: use --batching_strategy padding")
    if t.use_peft and t.peft_method != "lora":
        raise ConfigError(f"--method dpo scores the reference model as the model with its LoRA "
                          f"turned off; --peft_method {t.peft_method} is not supported: use "
                          "--peft_method lora")
    if t.from_peft_checkpoint:
        raise ConfigError("--method dpo with --from_peft_checkpoint would score the reference as "
                          "the base model without that adapter, not as the model you start from. "
                          "Merge the adapter first (python -m llm_finetune.convert "
                          "merge_adapters) and pass the merged model as --model_name")
    if t.enable_fsdp and not t.use_peft:
        raise ConfigError("--method dpo with full fine-tuning under --enable_fsdp would need a "
                          "second, sharded frozen model as the reference, which is not supported: "
                          "add --use_peft (the reference is the model with its LoRA off), or "
                          "use --enable_ddp or one process")


ALPACA_SOURCE = ("https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/"
                 "alpaca_data.json")


def check_data_files(run: RunConfig) -> None:
    """Every local data file the run will read exists, before the model loads (a custom data
    set's ``data_path`` is its function's to read: it may name anything)."""
    t = run.train
    data_path = getattr(run.dataset, "data_path", "")
    if data_path and t.dataset != "custom_dataset" and not os.path.exists(data_path):
        where = ""
        if Path(data_path).name == "alpaca_data.json":
            where = (f". It is the Stanford Alpaca data set that llama-recipes trains on: "
                     f"download it from {ALPACA_SOURCE} and point --{t.dataset}.data_path at "
                     "the file (relative paths start from the current directory)")
        raise ConfigError(f"--{t.dataset}.data_path {data_path}: no such file{where}")
    for setting in ("data_files", "eval_files", "train_file", "eval_file"):
        for file in str(getattr(run.dataset, setting, "")).split(","):
            if file.strip() and not Path(file.strip()).is_file():
                raise ConfigError(f"--{t.dataset}.{setting}: {file.strip()}: no such file")
    if t.dataset in ("samsum_dataset", "grammar_dataset", "llamaguard_toxicchat_dataset"):
        for setting in ("train_split", "test_split"):  # llama-recipes names files there
            split = getattr(run.dataset, setting)
            if Path(split).suffix in BUILDERS and not Path(split).is_file():
                raise ConfigError(f"--{t.dataset}.{setting}: {split}: no such file")


def hybrid_mesh_shape(f: fsdp_config, world_size: int) -> tuple[int, int]:
    """(sharding group size, replica count) for HYBRID_SHARD, filling in zeros from the world."""
    shard = f.sharding_group_size or (world_size // f.replica_group_size
                                      if f.replica_group_size else world_size)
    replica = f.replica_group_size or max(world_size // max(shard, 1), 1)
    return shard, replica


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
