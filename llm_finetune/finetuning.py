"""``finetuning.main(**kwargs)``: one fine-tuning run, read top to bottom.

    python -m llm_finetune.finetuning                       # tiny built-in model on CPU
    torchrun --nproc_per_node 2 -m llm_finetune.finetuning --enable_fsdp --use_peft
    torchrun --nproc_per_node 2 -m llm_finetune.finetuning --enable_ddp --use_peft --quantization 8bit
    python -m llm_finetune.finetuning --config configs/llama3_8b_lora.yaml --lr 2e-4
"""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import fire
import torch

from llm_finetune import distributed
from llm_finetune.adapters import apply_peft
from llm_finetune.checkpoint_files import checkpoint_step, resolve_resume
from llm_finetune.config_utils import ConfigError, build_run_config, describe_recipe, field_help
from llm_finetune.data import build_dataloaders
from llm_finetune.data.loaders import images_per_row
from llm_finetune.data.rows import DataError
from llm_finetune.determinism import make_deterministic
from llm_finetune.engine import (compile_layers, enable_activation_checkpointing, meta_init_fn,
                                 wrap_fsdp)
from llm_finetune.float8 import convert_to_float8
from llm_finetune.export import ModelSaver
from llm_finetune.loss import NextTokenLoss
from llm_finetune.metrics import (MetricsLog, PhaseTimer, flops_per_token,
                                  model_flops_utilization, report_parameter_counts)
from llm_finetune.model import (decoder_layer_classes, fit_embeddings_to_tokenizer,
                                freeze_layers, init_after_adapters, is_vision_model, load_model,
                                load_processor, load_tokenizer, text_layers)
from llm_finetune.optim import build_optimizer, build_scheduler
from llm_finetune.output_dir import check_output_dir, check_output_dir_reuse, clear_previous_run
from llm_finetune.plan import apply_gpu_defaults, fit_to_gpu, plan_run
from llm_finetune.plot import plot
from llm_finetune.precision import choose_precision, make_grad_scaler
from llm_finetune.preference import PreferenceLoss, reference_model
from llm_finetune.preflight import validate
from llm_finetune.progress import quiet_library_bars_off_terminal
from llm_finetune.quantization import bnb_config
from llm_finetune.random_init import SeededInit
from llm_finetune.samples import SampleAnswers
from llm_finetune.trackers import Trackers
from llm_finetune.train import Trainer
from llm_finetune.training_checkpoint import Checkpointer
from llm_finetune.vision import (UNQUANTIZED, check_vision_settings, freeze_llm_only,
                                 lora_exclude)


def main(**kwargs) -> dict:
    """Fine-tune a causal LM. Keyword arguments are the settings of ``llm_finetune.configs``
    (flat ``lr=...`` or dotted ``fsdp_config.pure_bf16=True``); returns the run's summary."""
    # 1. config: every setting checked before anything expensive happens
    first_rank = os.environ.get("RANK", "0") == "0"
    cuda = torch.cuda.is_available()
    world_size = distributed.world_size_from_env()
    run = configure(kwargs, world_size, cuda, verbose=first_rank)
    if run.train.dry_run:  # the memory plan instead of the run (printed by the first rank)
        return {"plan": plan_run(run, world_size, run.train.gpu_memory or None)
                if first_rank else ""}
    check_output_dir_reuse(run.train)
    quiet_library_bars_off_terminal()
    precision = choose_precision(run, cuda)

    # 2. distributed set-up (a one-rank group when FSDP runs in a single process)
    dist_info, owns_group = distributed.setup(
        need_group=run.train.enable_fsdp or run.train.enable_ddp,
        timeout_minutes=run.train.distributed_timeout_minutes)
    if dist_info.is_main:
        clear_previous_run(run.train)
    torch.manual_seed(run.train.seed)
    phases = PhaseTimer(verbose=dist_info.is_main)
    # 3. data, before the model: a bad file or setting stops the run before minutes of loading
    # a vision model's processor renders and batches images with the text (docs/vision.md)
    vision = is_vision_model(run.train.model_name)
    check_vision_settings(run, vision)  # preflight could not read a hub model's config
    processor = load_processor(run.train) if vision else None
    tokenizer = processor.tokenizer if vision else load_tokenizer(run.train)
    train_loader, eval_loader = build_dataloaders(run, tokenizer, dist_info, processor)
    images = images_per_row(train_loader) if vision else 0
    # the plan behind the GPU defaults and --auto_fit, made before the data, counted fewer
    if images > run.train.images_per_sample and (cuda or run.train.auto_fit):
        replanned = plan_for_images(run, kwargs, images, world_size, cuda, dist_info.is_main)
        if batching(replanned) != batching(run):
            train_loader, eval_loader = build_dataloaders(replanned, tokenizer, dist_info,
                                                          processor)
        run = replanned
    phases.mark("data")

    # 4. model: weights (or a seeded random init), adapters, checkpointing, FSDP or the device
    model, num_layers, hidden_size = build_model(run, precision, tokenizer, dist_info, phases,
                                                 vision)
    total_params, trainable_params = report_parameter_counts(model, dist_info)
    check_output_dir(model, run, dist_info)

    # 5. train
    steps_per_epoch = math.ceil(len(train_loader) / run.train.gradient_accumulation_steps)
    total_steps = total_optimizer_steps(run.train, steps_per_epoch, verbose=dist_info.is_main)
    optimizer = build_optimizer(model, run.train, grad_scaler=precision.grad_scaler,
                                kind=run.fsdp.optimizer)
    scheduler = build_scheduler(optimizer, run.train, steps_per_epoch, total_steps)
    resume_from = resolve_resume(run)
    resumed_step = checkpoint_step(resume_from) if resume_from else None
    trackers = Trackers(run, enabled=dist_info.is_main, resumed_step=resumed_step)
    metrics = MetricsLog(str(Path(run.train.output_dir) / "metrics.jsonl"),
                         enabled=run.train.save_metrics and dist_info.is_main,
                         resumed_step=resumed_step, trackers=trackers)
    if dist_info.is_main:
        write_run_config(run)
    scaler = make_grad_scaler(precision, run.train.enable_fsdp, dist_info.device)
    # DDP wraps the model for training only; saving and checkpoints see the model itself
    trained = distributed.data_parallel(model, dist_info) if run.train.enable_ddp else model
    # the objective before a checkpoint is restored: a full fine-tuning DPO reference copies
    # the weights the run started from
    samples = (SampleAnswers(tokenizer, run.train.eval_prompts, run.train.eval_max_new_tokens,
                             dist_info.device) if run.train.eval_prompts else None)
    trainer = Trainer(trained, optimizer, scheduler, run, dist_info, precision, metrics, scaler,
                      objective=objective_of(run, trained), samples=samples)
    checkpoints = Checkpointer(run, dist_info, model, optimizer, scheduler,
                               train_loader.batch_sampler, scaler)
    # the model: after each epoch with the best eval loss so far (llama-recipes), or at the end
    saver = ModelSaver(run, model, processor or tokenizer, dist_info, optimizer,
                       precision.weight_dtype)
    if resume_from is not None:
        checkpoints.restore(trainer, resume_from)
    checkpoints.start(trainer)

    def on_epoch_end(trainer):  # the model first: the checkpoint then records it as saved
        saver.epoch_end(trainer)
        checkpoints.epoch_end(trainer)

    summary = trainer.fit(train_loader, eval_loader, total_steps,
                          on_step_end=checkpoints.maybe_save, on_epoch_end=on_epoch_end)
    phases.mark("train")
    per_token = flops_per_token(total_params, trainable_params, num_layers, hidden_size,
                                summary["attention_length"])
    summary.update(model_flops_utilization(summary["tokens_per_s"], per_token,
                                           dist_info.world_size))

    # 6. save (the final model, unless the best epoch's was saved during training)
    saved_to = saver.finish()
    if saved_to is not None:
        summary["saved_to"] = str(saved_to)
        if saver.saves_best_epochs:
            summary["best_epoch"] = trainer.best_epoch
        phases.mark("save")
    summary["phase_s"] = phases.seconds
    trackers.close()
    if (dist_info.is_main and run.train.save_metrics and run.train.plot_metrics
            and importlib.util.find_spec("matplotlib") is not None):
        summary["plots"] = plot(run.train.output_dir)
    summary["metrics"] = metrics.records
    if dist_info.is_main:
        print_summary(summary)
    summary["model"] = model  # the trained model, for notebooks and tests
    # Only a run that ended well tears its group down. On an error another rank may be blocked
    # in a collective, and destroying an NCCL group under it would hang this rank too; the
    # exception ends this process and torchrun stops the others.
    # DDP's gradient reducer holds the group: free it while the group still exists (freed
    # after the teardown, gloo's destructor can wait forever on a peer that already exited)
    del trainer, trained
    if owns_group:
        distributed.teardown()
    return summary


def configure(kwargs: dict, world_size: int, cuda: bool, verbose: bool):
    """The run's settings: built (a built-in model's recipe said), checked, made deterministic
    before CUDA does any work if asked, and on a GPU fast by default (``plan.gpu_defaults``)
    or fitted to it under ``--auto_fit``."""
    run = build_run_config(**kwargs)
    if run.recipe and verbose:
        print(describe_recipe(run), flush=True)
    validate(run, world_size, cuda)
    if run.train.deterministic:  # before CUDA does any work, and before the model is built
        make_deterministic()
    # on a GPU, what was not given takes its fastest value (printed); --auto_fit asks for it.
    # A dry run that plans for a stated GPU plans what that GPU would run
    planned_gpu = cuda or (run.train.dry_run and bool(run.train.gpu_memory))
    run = apply_gpu_defaults(run, world_size, planned_gpu, verbose)
    if run.train.auto_fit:  # the fastest micro-batch and checkpointing this GPU holds
        run = fit_to_gpu(run, world_size, cuda)
    return run


def plan_for_images(run, kwargs: dict, images: int, world_size: int, cuda: bool,
                    verbose: bool):
    """The run planned again for rows of ``images`` images: the GPU defaults and
    ``--auto_fit`` chose its micro-batch and checkpointing for ``--images_per_sample`` images
    per row before any row was read."""
    if verbose:
        print(f"rows hold up to {images} images and the memory plan counted "
              f"{run.train.images_per_sample}: planned again with --images_per_sample {images}",
              flush=True)
    return configure({**kwargs, "images_per_sample": images}, world_size, cuda, verbose)


def batching(run) -> tuple:
    """What the data loaders are built from, of the settings a plan may change."""
    t = run.train
    return t.batch_size_training, t.gradient_accumulation_steps, t.max_train_step


def build_model(run, precision, tokenizer, dist_info, phases, vision: bool = False):
    """The model ready to train, with its decoder layers and hidden size (for MFU). Rank 0
    alone reads weights under low_cpu_fsdp; a random-init model stays on the meta device until
    its adapters are in place, then each rank initialises its units. ``vision``: an image-text
    model, whose image side LoRA leaves alone (docs/vision.md)."""
    seeded_init = init_after_adapters(run.train)
    # 4-bit layers are quantised unit by unit as FSDP materialises them (model.quantized_at_load)
    rank0_loads = run.train.low_cpu_fsdp and not seeded_init
    model = load_model(run.train, precision.weight_dtype,
                       on_meta=seeded_init or (rank0_loads and not dist_info.is_main),
                       quantization_config=bnb_config(run, precision,
                                                      keep=UNQUANTIZED if vision else ()),
                       init_device="cpu" if run.train.enable_fsdp else dist_info.device)
    fit_embeddings_to_tokenizer(model, tokenizer, verbose=dist_info.is_main)
    num_layers = len(text_layers(model))
    hidden_size = model.config.get_text_config().hidden_size
    if run.train.freeze_layers:
        freeze_layers(model, run.train.num_freeze_layers)
    if run.train.freeze_LLM_only:
        freeze_llm_only(model, decoder_layer_classes(model))
    if run.train.use_peft:
        model = apply_peft(model, run, num_layers, adapter_dtype=precision.trainable_dtype,
                           exclude=lora_exclude(model, run) if vision else None)
    if run.fsdp.fsdp_activation_checkpointing:
        enable_activation_checkpointing(model, keep_last=run.fsdp.no_checkpoint_layers)
    if run.train.float8:
        converted = convert_to_float8(text_layers(model))
        if dist_info.is_main:
            emulated = (" (emulated on CPU: slower than without it, for testing)"
                        if dist_info.device.type == "cpu" else "")
            print(f"float8: {converted} linear layers compute in float8 (torchao){emulated}",
                  flush=True)
    if run.train.torch_compile:
        compile_layers(model)
    phases.mark("load")
    if run.train.enable_fsdp:
        init_fn = meta_init_fn(model, dist_info, run.train.seed, seeded_init,
                               from_rank0=rank0_loads)
        model = wrap_fsdp(model, run.fsdp, dist_info, precision.compute_dtype, init_fn)
    elif seeded_init:
        SeededInit(model, run.train.seed, dist_info.device)(model)
    elif run.train.quantization == "":
        model.to(dist_info.device)
    phases.mark("shard" if run.train.enable_fsdp else "to_device")
    return model, num_layers, hidden_size


def total_optimizer_steps(train_cfg, steps_per_epoch: int, verbose: bool) -> int:
    """The run's optimizer steps: every epoch's, or fewer under ``max_train_step``, which counts
    micro-batches per rank as llama-recipes does. Micro-batches short of a whole optimizer step
    are not run (llama-recipes computes their gradients and never applies them)."""
    every_epoch = steps_per_epoch * train_cfg.num_epochs
    if not train_cfg.max_train_step:
        return every_epoch
    accumulation = train_cfg.gradient_accumulation_steps
    limit = train_cfg.max_train_step // accumulation
    if verbose and accumulation > 1 and limit < every_epoch:
        left = train_cfg.max_train_step % accumulation
        print(f"--max_train_step {train_cfg.max_train_step} micro-batches with "
              f"--gradient_accumulation_steps {accumulation}: {limit} optimizer steps"
              + (f" (micro-batches left over, not run: {left})" if left else ""),
              flush=True)
    return min(every_epoch, limit)


def objective_of(run, model):
    """What the steps minimise: the next-token loss on responses (``--method sft``) or the
    preference loss of pairs against a reference model (``--method dpo``)."""
    if run.train.method == "dpo":
        return PreferenceLoss(model, reference_model(run, model), run.train.dpo_beta,
                              run.train.dpo_loss, chunked=run.train.chunked_loss)
    return NextTokenLoss(model, chunked=run.train.chunked_loss)


def write_run_config(run) -> None:
    path = Path(run.train.output_dir) / "run_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run.to_dict(), indent=2) + "\n")


def print_summary(summary: dict) -> None:
    shown = {k: v for k, v in summary.items() if k not in ("metrics", "model")}
    print("run summary: " + json.dumps(shown, default=str), flush=True)


def usage() -> str:
    """What ``--help`` prints: how to launch, then every setting with its default."""
    return ("usage: python -m llm_finetune.finetuning [--config FILE.yaml] [--SETTING VALUE ...]\n"
            "       torchrun --nproc_per_node N -m llm_finetune.finetuning --enable_fsdp ...\n"
            "Settings are --key value (or --key=value); a bare --flag means True. Dotted keys set "
            "one config (--lora_config.r 16). Docs: docs/configuration.md\n"
            "The defaults are llama-recipes' (docs/llama_recipes.md); the built-in tiny-llama "
            "brings its own recipe for the settings not given (llm_finetune/configs/recipes.py)."
            "\n\n" + field_help())


def cli(*args, **kwargs) -> None:
    """Command-line entry: settings errors print one clear message and exit with status 2."""
    if args:
        print(f"error: unexpected positional argument(s) {args}; settings are --key value",
              file=sys.stderr)
        sys.exit(2)
    if any(kwargs.pop(flag, False) for flag in ("help", "h", "help_settings")):
        print(usage())
        return
    try:
        main(**kwargs)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def console_main() -> None:
    fire.Fire(cli)


if __name__ == "__main__":
    console_main()
