"""The run's main settings. Field names, meanings and defaults are llama-recipes' ``train_config``
(docs/llama_recipes.md lists every difference and why), so that existing command lines train the
same way. The built-in tiny model brings its own small recipe for what is not given
(``configs/recipes.py``): the quickstart runs in a minute on CPU without bending these."""

from dataclasses import dataclass


@dataclass
class train_config:
    # Model and tokenizer: a Hugging Face hub name, a local directory, or a built-in name
    # ("tiny-llama"). A directory holding only config.json is initialised randomly.
    model_name: str = "tiny-llama"
    tokenizer_name: str = ""  # empty: the model's own tokenizer
    # Distributed
    enable_fsdp: bool = False
    enable_ddp: bool = False  # data parallel, a full replica per rank (what 8-bit bases need)
    low_cpu_fsdp: bool = False  # rank 0 alone reads the weights; other ranks start on "meta"
    one_gpu: bool = False  # llama-recipes' single-process flag: refuses a multi-rank launch
    # how long a rank waits in a collective while another works alone (rank 0 reading a 70B
    # model under low_cpu_fsdp, tokenising, writing a FULL_STATE_DICT); docs/large_models.md
    distributed_timeout_minutes: int = 60
    # Data
    dataset: str = "samsum_dataset"
    batching_strategy: str = "packing"  # packing | padding
    bad_rows: str = "fail"  # fail | skip: rows with a missing/wrong/empty field
    context_length: int = 4096  # block length (packing) or longest sample (padding)
    tokenize_num_proc: int = 1  # processes that tokenise the data set (datasets.map num_proc)
    batch_size_training: int = 4  # per rank, per micro-batch
    val_batch_size: int = 1
    num_workers_dataloader: int = 1
    # Optimisation
    num_epochs: int = 3
    # micro-batches per rank in the whole run, as llama-recipes counts them (optimizer steps:
    # max_train_step // gradient_accumulation_steps); 0: no limit
    max_train_step: int = 0
    max_eval_step: int = 0  # eval batches per evaluation; 0: the whole eval split
    gradient_accumulation_steps: int = 1
    gradient_clipping: bool = False
    gradient_clipping_threshold: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_scheduler: str = "step"  # step (StepLR each epoch by gamma) | cosine | linear | constant
    gamma: float = 0.85
    warmup_steps: int = 0  # linear warm-up, in optimizer steps, before any schedule
    seed: int = 42
    # deterministic algorithms only (cuBLAS workspace, cuDNN, SDPA backends): on a GPU, runs
    # and resumed runs repeat bit for bit, at some cost in speed (docs/checkpoints.md)
    deterministic: bool = False
    # Precision: bf16 mixed precision on GPUs that support it; CPU runs compute in fp32
    mixed_precision: bool = True
    use_fp16: bool = False
    use_fast_kernels: bool = False  # flash-attention 2 when installed, else PyTorch SDPA
    chunked_loss: bool = True  # the loss in chunks inside the output layer: no full logits
    torch_compile: bool = False  # compile each decoder layer (torch.compile; first steps slower)
    # float8 matmuls in the decoder layers (torchao), for full fine-tuning on H100-class GPUs
    # with --torch_compile True (llm_finetune/float8.py, docs/performance.md)
    float8: bool = False
    # Objective: sft (next-token loss on the responses) | dpo (preference pairs against a
    # reference model: docs/preference.md)
    method: str = "sft"
    dpo_beta: float = 0.1  # how far from the reference model the preferences may pull
    dpo_loss: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge
    # Parameter-efficient fine-tuning
    use_peft: bool = False
    peft_method: str = "lora"  # lora | llama_adapter | prefix
    from_peft_checkpoint: str = ""  # continue training saved adapters
    freeze_layers: bool = False
    num_freeze_layers: int = 1
    # a vision model: its language model frozen, its image encoder, projector and
    # cross-attention layers trained (llama-recipes' Mllama recipe; docs/vision.md)
    freeze_LLM_only: bool = False
    quantization: str = ""  # "" | 4bit | 8bit
    # Evaluation, outputs
    run_validation: bool = True
    # stop when this many evaluations in a row (one per epoch) have not lowered the eval loss;
    # 0: never. The best epoch's model is what remains (save_best)
    early_stopping_patience: int = 0
    # a file of prompts (JSON list, or one per line) the model answers greedily at each
    # evaluation, as written; the answers go to metrics.jsonl and the trackers
    eval_prompts: str = ""
    eval_max_new_tokens: int = 32
    # the run's outputs; a PEFT adapter is saved here, as llama-recipes does; full weights in
    # output_dir/model; a sharded model under dist_checkpoint_root_folder
    output_dir: str = "output"
    overwrite_output_dir: bool = False  # replace a previous run's output_dir (else refused)
    save_model: bool = True
    # with run_validation, the model is saved after each epoch whose eval loss is the lowest so
    # far, as llama-recipes does: the best epoch's model remains. False (or no validation): the
    # model is saved once, at the end
    save_best: bool = True
    save_optimizer: bool = False
    dist_checkpoint_root_folder: str = ""  # empty: output_dir
    dist_checkpoint_folder: str = "fine-tuned"
    save_metrics: bool = True  # output_dir/metrics.jsonl, one JSON object per step
    plot_metrics: bool = True  # output_dir/plots/*.png at the end (when matplotlib is installed)
    # Observability
    dry_run: bool = False  # print the memory plan (python -m llm_finetune.plan) and exit
    gpu_memory: str = ""  # for --dry_run and --auto_fit, e.g. 80GiB ("": the GPU here)
    # the memory plan's images per row of a vision model (a DPO pair's on each side); a run
    # whose rows hold more plans again with their number
    images_per_sample: int = 1
    # the planner's fastest micro-batch and activation checkpointing that fit in 90% of the
    # GPU (same tokens per optimizer step; the micro-batch changes in one process only)
    auto_fit: bool = False
    flop_counter: bool = False  # count FLOPs of one optimizer step
    flop_counter_start: int = 3  # steps to run before the counted one
    use_profiler: bool = False  # torch.profiler trace of steps 4-6 for TensorBoard
    profiler_dir: str = ""  # empty: output_dir/profiler
    # a GPU's allocations up to the end of this optimizer step, for pytorch.org/memory_viz
    # (output_dir/memory_snapshot/rankR.pickle); 0: none
    memory_snapshot_step: int = 0
    use_wandb: bool = False  # log metrics to Weights & Biases (wandb_config)
    use_tensorboard: bool = False  # TensorBoard scalars in output_dir/tensorboard
    # Training checkpoints (output_dir/checkpoints/step-N) and resuming from them
    save_steps: int = 0  # every N optimizer steps; 0: none
    save_each_epoch: bool = False  # also at the end of every epoch
    save_total_limit: int = 0  # keep the newest K; 0: all
    resume_from_checkpoint: str = ""  # "auto" (newest complete one in output_dir) or a path
