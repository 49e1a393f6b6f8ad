"""The training loop and evaluation.

The loss of an optimizer step is the mean over *every* label token of that step: all
micro-batches of gradient accumulation on all ranks. Each rank backpropagates its token-loss
sum scaled by ``world_size / total_tokens`` (FSDP then averages over ranks), so N ranks, or k
accumulation steps, give the gradient of one process running the whole global batch. Averaging
per-micro-batch means instead (llama-recipes, and transformers before 4.46) weights short
samples more and makes sharded losses differ from single-process ones.
"""

import contextlib
import math
import resource
import time

import torch
from tqdm import tqdm

from llm_finetune.distributed import DistInfo, all_reduce_sum
from llm_finetune.errors import ConfigError
from llm_finetune.loss import NextTokenLoss
from llm_finetune.profiling import StepProfiler
from llm_finetune.progress import on_terminal, progress_bar

DATA_WAIT_WARNING = 0.1  # share of training time spent waiting for batches that gets a warning


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device``; other values (a custom collator's) as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def peak_gpu_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def memory_trace() -> dict:
    """Peak GPU memory allocated and reserved by the caching allocator (what nvidia-smi sees,
    minus the CUDA context), and this process's peak resident CPU memory, in GiB."""
    trace = {"peak_cpu_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if torch.cuda.is_available():
        trace["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        trace["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return trace


def add_sums(totals: dict, sums: dict) -> None:
    """Add an objective's metric sums of one micro-batch into ``totals``, on the device."""
    for name, value in sums.items():
        totals[name] = totals.get(name, 0.0) + value.detach().double()


def grouped(loader, size: int):
    """Micro-batches in groups of ``size``, one optimizer step each (the sampler yields whole
    groups; a shorter last group would only come from a custom sampler)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class Trainer:
    """Optimizer steps over a loader, evaluation after each epoch, one metrics record per step.
    What is computed per micro-batch is the ``objective``'s (default ``NextTokenLoss``); the
    loop itself is the same for every method and model."""

    def __init__(self, model, optimizer, scheduler, run, dist_info: DistInfo, precision,
                 metrics, grad_scaler=None, objective=None, samples=None):
        self.model = model
        self.samples = samples  # samples.SampleAnswers for --eval_prompts, or None
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.run = run
        self.dist = dist_info
        self.precision = precision
        self.metrics = metrics
        self.grad_scaler = grad_scaler
        self.data_parallel = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        self.objective = objective or NextTokenLoss(model, chunked=run.train.chunked_loss)
        self.step = 0  # optimizer steps done
        self.epoch = 0  # the epoch in progress
        # optimizer steps done in that epoch: the data position a checkpoint records (the
        # loader's workers fetch batches ahead, so only the loop knows what was consumed)
        self.steps_in_epoch = 0
        # sum over trained sequences of length x length and of length: their ratio is the
        # sequence length an average token attends over (attention's share of MFU)
        self.positions_squared, self.positions = 0, 0
        # the lowest eval loss so far and its epoch (1-based), as llama-recipes tracks it to
        # save the best epoch's model; new_best: the last evaluation set them
        self.best_eval_loss = math.inf
        self.best_epoch = 0
        self.new_best = False

    def autocast(self):
        if not self.precision.autocast or self.run.train.enable_fsdp:  # FSDP casts itself
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.precision.compute_dtype)

    def gradient_sync(self, last: bool):
        """DDP all-reduces the gradients in the step's last micro-batch only; the others
        accumulate locally (``no_sync``). FSDP and one process: nothing to skip."""
        if self.data_parallel and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def clip_gradients(self) -> None:
        threshold = self.run.train.gradient_clipping_threshold
        if hasattr(self.model, "clip_grad_norm_"):  # FSDP: norm over all shards
            self.model.clip_grad_norm_(threshold)
        else:
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], threshold)

    def train_step(self, micro_batches: list[dict]) -> tuple[float, int, dict]:
        """One optimizer step; returns (mean loss over all ranks, tokens processed, the
        objective's own metrics as means over the same units).

        Under fp16 loss scaling a step whose gradients overflow is skipped by the scaler, which
        then halves its scale: ``metrics.jsonl`` records the scale so skipped steps are visible."""
        local_tokens = sum(self.objective.units(b) for b in micro_batches)
        input_tokens = sum(int(b["num_tokens"]) for b in micro_batches)
        for b in micro_batches:
            sequences, length = b["input_ids"].shape
            self.positions += sequences * length
            self.positions_squared += sequences * length * length
        total_tokens, total_inputs = all_reduce_sum([local_tokens, input_tokens], self.dist.device)
        scale = self.dist.world_size / max(total_tokens, 1)
        # summed on the device: reading it per micro-batch (.item()) would wait for the GPU to
        # finish each one, and leave it idle while the next one's kernels are launched
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        metric_sums = {}
        for index, batch in enumerate(micro_batches):
            batch = to_device(batch, self.dist.device)
            with self.gradient_sync(last=index == len(micro_batches) - 1):
                with self.autocast():
                    loss, _, sums = self.objective(self.model, batch)
                scaled = loss * scale
                (self.grad_scaler.scale(scaled) if self.grad_scaler else scaled).backward()
            loss_sum += loss.detach()
            add_sums(metric_sums, sums)
        if self.grad_scaler:
            self.grad_scaler.unscale_(self.optimizer)
        if self.run.train.gradient_clipping:
            self.clip_gradients()
        if self.grad_scaler:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        # DDP's gradients are views into its buckets: zeroed in place they stay views (set
        # to None, the next backward would allocate a second copy beside the buckets)
        self.optimizer.zero_grad(set_to_none=not self.data_parallel)
        self.scheduler.step()
        global_loss, *global_sums = all_reduce_sum([loss_sum, *metric_sums.values()],
                                                   self.dist.device)
        units = max(total_tokens, 1)
        means = {name: value / units for name, value in zip(metric_sums, global_sums)}
        return global_loss / units, int(total_inputs), means

    @torch.no_grad()
    def evaluate(self, loader) -> dict:
        self.model.eval()
        # summed on the device, as in train_step: no wait for the GPU after every batch
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dist.device)
        tokens, metric_sums = 0, {}
        max_steps = self.run.train.max_eval_step
        for i, batch in enumerate(tqdm(loader, desc="eval", leave=False,
                                       disable=not (self.dist.is_main and on_terminal()))):
            if max_steps and i >= max_steps:
                break
            with self.autocast():
                loss, n, sums = self.objective(self.model, to_device(batch, self.dist.device))
            loss_sum += loss
            tokens += n
            add_sums(metric_sums, sums)
        loss_sum, tokens, *sums = all_reduce_sum([loss_sum, tokens, *metric_sums.values()],
                                                 self.dist.device)
        self.model.train()
        eval_loss = loss_sum / max(tokens, 1)
        result = {"step": self.step, "eval_loss": eval_loss}
        if self.objective.perplexity:
            result["eval_perplexity"] = math.exp(min(eval_loss, 50.0))
        return result | {f"eval_{name}": value / max(tokens, 1)
                         for name, value in zip(metric_sums, sums)}

    def sample_answers(self) -> dict:
        """``--eval_prompts``' answers from the model as it is now, printed on rank 0."""
        self.model.eval()
        with self.autocast():
            record = self.samples(self.model, self.step)
        self.model.train()
        if self.dist.is_main:
            for sample in record["samples"]:
                print(f"sample at step {self.step}: {sample['prompt'][-60:]!r} -> "
                      f"{sample['answer'][:200]!r}", flush=True)
        return record

    def note_eval_loss(self, eval_loss: float, epoch: int) -> None:
        """Keep the lowest eval loss and its epoch; ``new_best`` says whether this one was."""
        self.new_best = eval_loss < self.best_eval_loss
        if self.new_best:
            self.best_eval_loss, self.best_epoch = eval_loss, epoch

    def patience_ran_out(self, epoch: int) -> bool:
        """``--early_stopping_patience``: whether the last that many evaluations all failed to
        lower the eval loss. Counted from the best epoch, which a checkpoint keeps, so a resumed
        run stops where the uninterrupted one would."""
        patience = self.run.train.early_stopping_patience
        if not patience or epoch - self.best_epoch < patience:
            return False
        if self.dist.is_main:
            print(f"early stopping after epoch {epoch}: the eval loss has not improved for "
                  f"{epoch - self.best_epoch} evaluations (best {self.best_eval_loss:.4f}, "
                  f"epoch {self.best_epoch})", flush=True)
        return True

    def warn_if_data_stalls(self, data_waited: float, wall: float) -> None:
        """Say so when the GPU spent more than a tenth of training waiting for batches."""
        if self.dist.is_main and wall > 0 and data_waited > DATA_WAIT_WARNING * wall:
            print(f"warning: {data_waited / wall:.0%} of the training time went to waiting for "
                  f"batches (data_wait_s in metrics.jsonl): raise --num_workers_dataloader "
                  f"(now {self.run.train.num_workers_dataloader})", flush=True)

    def fit(self, train_loader, eval_loader, total_steps: int, on_step_end=None,
            on_epoch_end=None) -> dict:
        """Train from ``self.step``/``self.epoch`` (0, or a restored checkpoint's) to
        ``total_steps``; ``on_step_end(trainer)`` runs after every optimizer step,
        ``on_epoch_end(trainer)`` after each epoch and its evaluation (``new_best`` says whether
        its eval loss is the lowest so far), with ``self.epoch`` already the next one (a
        checkpoint taken there resumes at the next epoch). A restored
        ``self.steps_in_epoch`` is where the loader's sampler was told to continue."""
        t = self.run.train
        summary = {"train_loss": [], "eval_loss": [], "eval_perplexity": []}
        started = time.perf_counter()
        tokens_seen, data_waited = 0, 0.0
        profiler = StepProfiler(t, self.dist.is_main, self.dist.rank, first_step=self.step + 1)
        try:
            for epoch in range(self.epoch, t.num_epochs):
                self.epoch = epoch
                losses, tokens, waited = self.train_epoch(train_loader, total_steps, profiler,
                                                          on_step_end)
                tokens_seen, data_waited = tokens_seen + tokens, data_waited + waited
                if losses:
                    summary["train_loss"].append(sum(losses) / len(losses))
                if eval_loader is not None:
                    result = self.evaluate(eval_loader)
                    self.metrics.log(result)
                    self.note_eval_loss(result["eval_loss"], epoch + 1)
                    if self.samples is not None:
                        self.metrics.log(self.sample_answers())
                    for key, value in result.items():
                        if key != "step":
                            summary.setdefault(key, []).append(value)
                if self.dist.is_main:
                    shown = {k: round(v[-1], 4) for k, v in summary.items() if v}
                    print(f"epoch {epoch + 1}: {shown} memory {memory_trace()}", flush=True)
                self.epoch, self.steps_in_epoch = epoch + 1, 0
                if on_epoch_end is not None:
                    on_epoch_end(self)
                if self.step >= total_steps:
                    break
                if self.patience_ran_out(epoch + 1):
                    summary["stopped_early_after_epoch"] = epoch + 1
                    break
        except BaseException as error:  # an OOM's memory snapshot is the one most wanted
            profiler.close(error)
            raise
        profiler.close()
        wall = time.perf_counter() - started
        summary.update(steps=self.step, train_time_s=wall, tokens_per_s=tokens_seen / wall,
                       attention_length=self.positions_squared / max(self.positions, 1),
                       data_wait_s=data_waited, peak_gpu_mem_gib=peak_gpu_gib(), **memory_trace())
        self.warn_if_data_stalls(data_waited, wall)
        if profiler.flops_per_step is not None:
            summary["flops_per_step"] = profiler.flops_per_step
        return summary

    def train_epoch(self, train_loader, total_steps: int, profiler,
                    on_step_end=None) -> tuple[list[float], int, float]:
        """The optimizer steps of ``self.epoch`` (from a restored position, up to
        ``total_steps``), one metrics record each; returns (step losses, tokens, seconds spent
        waiting for batches).

        A step's time runs from asking the loader for its batches to the optimizer step done:
        the step ends in a GPU sync (its loss), so time spent waiting for data is time the GPU
        stands idle, and it counts. ``data_wait_s`` says how much it was."""
        t = self.run.train
        train_loader.batch_sampler.set_epoch(self.epoch)
        self.model.train()
        losses, tokens_seen, data_waited = [], 0, 0.0
        bar = progress_bar(min(math.ceil(len(train_loader) / t.gradient_accumulation_steps),
                               total_steps - self.step),
                           f"epoch {self.epoch + 1}/{t.num_epochs}", enabled=self.dist.is_main)
        step_start = time.perf_counter()
        for micro_batches in grouped(train_loader, t.gradient_accumulation_steps):
            if self.step >= total_steps:
                break
            data_wait = time.perf_counter() - step_start
            lr = self.optimizer.param_groups[0]["lr"]
            with profiler.step(self.step + 1):
                loss, tokens, objective_metrics = self.train_step(micro_batches)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step + 1}: stopping; "
                                         "lower --lr or enable --gradient_clipping")
            self.step += 1
            self.steps_in_epoch += 1
            tokens_seen += tokens
            data_waited += data_wait
            tokens_per_s = tokens / max(time.perf_counter() - step_start, 1e-9)
            losses.append(loss)
            record = {"step": self.step, "epoch": self.epoch + 1, "loss": loss,
                      **objective_metrics, "lr": lr, "tokens_per_s": tokens_per_s,
                      "data_wait_s": round(data_wait, 6), "peak_gpu_mem_gib": peak_gpu_gib()}
            if self.grad_scaler is not None:
                record["grad_scale"] = float(self.grad_scaler.get_scale())
            self.metrics.log(record)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
            bar.update()
            if on_step_end is not None:
                on_step_end(self)  # checkpoints: not part of the next step's time
            step_start = time.perf_counter()
        bar.close()
        return losses, tokens_seen, data_waited

def check_training_numbers(t) -> None:
    """Counts, limits and the learning rate that the loop can run with."""
    positive = {"batch_size_training": t.batch_size_training, "val_batch_size": t.val_batch_size,
                "gradient_accumulation_steps": t.gradient_accumulation_steps,
                "num_epochs": t.num_epochs, "context_length": t.context_length}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}")
    if 0 < t.max_train_step < t.gradient_accumulation_steps:
        raise ConfigError(f"--max_train_step {t.max_train_step} counts micro-batches (as in "
                          f"llama-recipes), fewer than one optimizer step of "
                          f"--gradient_accumulation_steps {t.gradient_accumulation_steps}: the run "
                          f"would not train. Give at least {t.gradient_accumulation_steps}")
    if t.max_train_step < 0 or t.max_eval_step < 0:
        raise ConfigError("--max_train_step and --max_eval_step must be 0 (no limit) or positive")
    if t.save_steps < 0 or t.save_total_limit < 0:
        raise ConfigError("--save_steps and --save_total_limit must be 0 (off) or positive")
    if t.lr <= 0:
        raise ConfigError(f"--lr must be positive, got {t.lr}")
    if t.early_stopping_patience < 0:
        raise ConfigError(f"--early_stopping_patience must be 0 (off) or positive, got "
                          f"{t.early_stopping_patience}")
    if t.early_stopping_patience and not t.run_validation:
        raise ConfigError("--early_stopping_patience stops on the eval loss, and --run_validation "
                          "is off: turn it on, or drop --early_stopping_patience")
