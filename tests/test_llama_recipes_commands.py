"""llama-recipes' documented fine-tuning command lines, as llama-cookbook's getting-started
finetuning docs print them, with only the script or module name, the model folder and the
output folder changed (and the placeholders of the HSDP line filled in). Each is read and
checked as a run reads it (world size from ``--nnodes`` x ``--nproc_per_node``, as on a GPU
machine) before anything loads; two run on CPU with the tiny model, with settings for a short
run on shipped data appended, and their outputs land where llama-recipes puts them."""

import json
import shlex
from pathlib import Path

import pytest
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llm_finetune import finetuning
from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.configs.datasets import SHIPPED_ALPACA
from llm_finetune.preflight import validate
from tests.helpers import REPO, parse_flags, save_tiny_model, torchrun

MULTI_GPU_LORA = ("torchrun --nnodes 1 --nproc_per_node 4  finetuning.py --enable_fsdp --model_name "
                  "/path_of_model_folder/8B --use_peft --peft_method lora --output_dir "
                  "Path/to/save/PEFT/model")
MULTI_GPU_FULL = ("torchrun --nnodes 1 --nproc_per_node 8  finetuning.py --enable_fsdp --model_name "
                  "/path_of_model_folder/8B --dist_checkpoint_root_folder model_checkpoints "
                  "--dist_checkpoint_folder fine-tuned --fsdp_config.pure_bf16 --use_fast_kernels")

# (where in llama-cookbook, the command as documented)
DOCUMENTED = [
    ("getting-started/finetuning/singlegpu_finetuning.md",
     "FSDP_CPU_RAM_EFFICIENT_LOADING=1 python finetuning.py  --use_peft --peft_method lora "
     "--quantization 8bit --model_name /path_of_model_folder/8B --output_dir Path/to/save/PEFT/model"),
    ("getting-started/finetuning/singlegpu_finetuning.md",
     "python -m finetuning.py  --use_peft --peft_method lora --quantization 8bit --dataset "
     "grammar_dataset --model_name /path_of_model_folder/8B --output_dir Path/to/save/PEFT/model"),
    ("getting-started/finetuning/singlegpu_finetuning.md",
     "python -m finetuning.py  --use_peft --peft_method lora --quantization 8bit  --dataset "
     "samsum_dataset --model_name /path_of_model_folder/8B --output_dir Path/to/save/PEFT/model"),
    ("getting-started/finetuning/multigpu_finetuning.md", MULTI_GPU_LORA),
    ("getting-started/finetuning/multigpu_finetuning.md", MULTI_GPU_FULL),
    ("getting-started/finetuning/multigpu_finetuning.md",
     "torchrun --nnodes 1 --nproc_per_node 8 finetuning.py --enable_fsdp --low_cpu_fsdp "
     "--fsdp_config.pure_bf16 --model_name /path_of_model_folder/70B --batch_size_training 1 "
     "--dist_checkpoint_root_folder model_checkpoints --dist_checkpoint_folder fine-tuned"),
    ("getting-started/finetuning/multigpu_finetuning.md",
     "srun  torchrun --nproc_per_node 8 --rdzv_id $RANDOM --rdzv_backend c10d --rdzv_endpoint "
     "$head_node_ip:29500 ./finetuning.py  --enable_fsdp --use_peft --peft_method lora "
     "--quantization 4bit  --quantization_config.quant_type nf4 --mixed_precision False "
     "--low_cpu_fsdp"),
    ("getting-started/finetuning/multigpu_finetuning.md",
     "torchrun --nnodes 1 --nproc_per_node 4  finetuning.py --enable_fsdp  --model_name "
     "/path_of_model_folder/8B --use_peft --peft_method lora --dataset grammar_dataset "
     "--save_model --dist_checkpoint_root_folder model_checkpoints --dist_checkpoint_folder "
     "fine-tuned  --fsdp_config.pure_bf16 --output_dir Path/to/save/PEFT/model"),
    ("getting-started/finetuning/multigpu_finetuning.md",
     "torchrun --nnodes 1 --nproc_per_node 4  finetuning.py --enable_fsdp --model_name "
     "/path_of_model_folder/8B --use_peft --peft_method lora --dataset samsum_dataset "
     "--save_model --dist_checkpoint_root_folder model_checkpoints --dist_checkpoint_folder "
     "fine-tuned --fsdp_config.pure_bf16 --output_dir Path/to/save/PEFT/model"),
    ("getting-started/finetuning/multigpu_finetuning.md",  # placeholders n = 8, world_size/n = 4
     "torchrun --nnodes 4 --nproc_per_node 8 ./finetuning.py --enable_fsdp --low_cpu_fsdp "
     "--fsdp_config.pure_bf16 --model_name /path_of_model_folder/70B --batch_size_training 1 "
     "--dist_checkpoint_root_folder model_checkpoints --dist_checkpoint_folder fine-tuned "
     "--hsdp --sharding_group_size 8 --replica_group_size 4"),
    ("getting-started/finetuning/datasets/README.md",
     'python -m llama_cookbook.finetuning --dataset "custom_dataset" --custom_dataset.file '
     '"custom_dataset.py"'),
]

# documented, and refused by the check with the fix (llama-recipes itself fails on them later)
REFUSED = [
    ("getting-started/finetuning/multigpu_finetuning.md",  # int4 is no quantization they know
     "FSDP_CPU_RAM_EFFICIENT_LOADING=1 ACCELERATE_USE_FSDP=1 torchrun --nnodes 1 "
     "--nproc_per_node 4  finetuning.py --enable_fsdp  --quantization int4 --model_name "
     "/path_of_model_folder/70B  --mixed_precision False --low_cpu_fsdp --use_peft --peft_method "
     "lora --output_dir Path/to/save/PEFT/model",
     "quantization='int4' is not one of: '', 4bit, 8bit"),
    ("getting-started/finetuning/singlegpu_finetuning.md",  # their alpaca file is downloaded
     "python -m finetuning.py  --use_peft --peft_method lora --quantization 8bit  --dataset "
     "alpaca_dataset --model_name /path_of_model_folder/8B --output_dir Path/to/save/PEFT/model",
     "download it from https://"),
    ("getting-started/finetuning/multigpu_finetuning.md",
     "torchrun --nnodes 1 --nproc_per_node 4  finetuning.py --enable_fsdp  --model_name "
     "/path_of_model_folder/8B --use_peft --peft_method lora --dataset alpaca_dataset "
     "--save_model --dist_checkpoint_root_folder model_checkpoints --dist_checkpoint_folder "
     "fine-tuned --fsdp_config.pure_bf16 --output_dir Path/to/save/PEFT/model",
     "download it from https://"),
]

# a short run on shipped data, appended to a documented command that is run
SHORT_RUN = ["--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", SHIPPED_ALPACA,
             "--batching_strategy", "padding", "--context_length", "128",
             "--batch_size_training", "2", "--val_batch_size", "2", "--num_epochs", "1",
             "--max_train_step", "2", "--max_eval_step", "1", "--num_workers_dataloader", "0",
             "--lr", "1e-3", "--plot_metrics", "False"]


def launch(command: str, model_dir: Path, output_dir: Path) -> tuple[int, list[str]]:
    """(world size, the finetuning arguments) of a documented command line, its model and
    output folders replaced and a custom data set file pointed at ours."""
    words = shlex.split(command)
    nodes = per_node = 1
    for flag, value in zip(words, words[1:]):
        if flag == "--nnodes":
            nodes = int(value)
        elif flag == "--nproc_per_node":
            per_node = int(value)
    script = next(i for i, w in enumerate(words)
                  if w.endswith("finetuning.py") or w.endswith(".finetuning"))
    replaced = {"/path_of_model_folder/8B": str(model_dir),
                "/path_of_model_folder/70B": str(model_dir),
                "Path/to/save/PEFT/model": str(output_dir)}
    args = [replaced.get(w, w) for w in words[script + 1:]]
    args = [str(REPO / "examples" / w) if w.startswith("custom_dataset.py") else w for w in args]
    return nodes * per_node, args


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "8B")


@pytest.mark.parametrize("where,command", DOCUMENTED)
def test_documented_command_is_accepted(where, command, model_dir, tmp_path):
    world_size, args = launch(command, model_dir, tmp_path / "out")
    run = build_run_config(**parse_flags(args)[1])
    validate(run, world_size, cuda=True)


@pytest.mark.parametrize("where,command,expected", REFUSED)
def test_documented_command_that_cannot_work_is_refused_with_the_fix(where, command, expected,
                                                                      model_dir, tmp_path):
    world_size, args = launch(command, model_dir, tmp_path / "out")
    with pytest.raises(ConfigError, match=expected):
        validate(build_run_config(**parse_flags(args)[1]), world_size, cuda=True)


def test_the_multi_gpu_lora_command_runs_and_leaves_llama_recipes_outputs(model_dir, tmp_path):
    """multigpu_finetuning.md's LoRA command (on 2 CPU ranks instead of 4 GPUs): the adapter in
    output_dir, llama-recipes' train_params.yaml beside it, loadable with plain peft."""
    _, args = launch(MULTI_GPU_LORA, model_dir, tmp_path / "out")
    torchrun("-m", "llm_finetune.finetuning", *args, *SHORT_RUN)
    out = tmp_path / "out"
    assert {"adapter_config.json", "adapter_model.safetensors", "train_params.yaml",
            "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    assert yaml.safe_load((out / "train_params.yaml").read_text())["model_name"] == str(model_dir)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)


def test_the_full_fsdp_command_saves_where_llama_recipes_does(model_dir, tmp_path, monkeypatch):
    """multigpu_finetuning.md's full fine-tuning command with pure bf16 (one rank here): the
    sharded model under dist_checkpoint_root_folder/dist_checkpoint_folder-<model>, relative to
    where the command runs, with train_params.yaml, as llama-recipes' converter expects."""
    monkeypatch.chdir(tmp_path)
    _, args = launch(MULTI_GPU_FULL, model_dir, tmp_path / "out")
    finetuning.main(**parse_flags(args + SHORT_RUN + ["--output_dir", str(tmp_path / "out")])[1])
    saved = tmp_path / "model_checkpoints" / "fine-tuned-8B"  # the model folder's last name
    assert list(saved.glob("*.distcp"))
    params = yaml.safe_load((saved / "train_params.yaml").read_text())
    assert params["model_name"] == str(model_dir)
    assert json.loads((tmp_path / "out" / "run_config.json").read_text())[
        "fsdp_config"]["pure_bf16"] is True
