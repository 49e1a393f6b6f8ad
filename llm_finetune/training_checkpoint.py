"""Save and restore a run in training: model, optimizer, learning-rate schedule, gradient
scaler, data position and RNG state, so a run can resume from a checkpoint exactly.
Finding and checking checkpoints on disk is ``checkpoint_files``.

Every ``save_steps`` optimizer steps the run writes ``output_dir/checkpoints/step-NNNNNNNN/``:
model and optimizer through ``torch.distributed.checkpoint`` (every rank writes its shards; a
PEFT run stores only the trainable adapter), the step, epoch, learning-rate schedule, gradient
scaler and data position (optimizer steps done in the epoch, counted by the trainer), and each
rank's RNG state at the step boundary. The directory is written as ``step-NNNNNNNN.tmp`` and
renamed only after every rank finished and rank 0 wrote ``MANIFEST.json`` (step, world size,
files and sizes), so a run killed while saving leaves no checkpoint that
``--resume_from_checkpoint auto`` would pick; a checkpoint is checked against its manifest before
use, and ``auto`` falls back past damaged ones. ``save_total_limit`` keeps the newest K.
"""

import json
import math
import random
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from llm_finetune.atomic_dir import fresh_tmp_dir, publish, tmp_dir_for
from llm_finetune.checkpoint_files import (MANIFEST, REPLACED, TRAINER_STATE, CheckpointError,
                                           CheckpointSaveError, checkpoints_dir, choose_checkpoint,
                                           latest_checkpoint, load_plain, read_manifest,
                                           remove_checkpoint,
                                           remove_leftovers, require_intact, save_finished,
                                           set_aside_newer, shape_mismatches, step_dir_name,
                                           step_dirs)
from llm_finetune.data.batching import global_batch_problem
from llm_finetune.distributed import DistInfo, all_reduce_sum, barrier
from llm_finetune.errors import ConfigError


def save_failure(error: BaseException | None) -> str:
    """One line on what went wrong in a save; DCP wraps each rank's error in a
    CheckpointException whose failures hold (exception, traceback) per rank."""
    if error is None:
        return "another rank failed to write its part"
    if isinstance(error, CheckpointException):
        causes = [pair[0] if isinstance(pair, tuple) else pair
                  for pair in error.failures.values()]
        return "; ".join(f"{type(c).__name__}: {c}" for c in causes) or "DCP save failed"
    return f"{type(error).__name__}: {error}"


class Checkpointer:
    def __init__(self, run, dist_info: DistInfo, model, optimizer, scheduler, sampler,
                 grad_scaler=None):
        self.run = run
        self.dist = dist_info
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.sampler = sampler
        self.grad_scaler = grad_scaler
        # a PEFT run's frozen base is already on disk: store only what trains
        self.options = StateDictOptions(ignore_frozen_params=run.train.use_peft, strict=False)
        self.last_saved_step = -1

    @property
    def output_dir(self) -> str:
        return self.run.train.output_dir

    def maybe_save(self, trainer) -> None:
        every = self.run.train.save_steps
        if every and trainer.step % every == 0:
            self.save(trainer)

    def epoch_end(self, trainer) -> None:
        """``save_each_epoch``: a checkpoint after each epoch (and its evaluation), unless the
        last step's checkpoint is already this one."""
        if self.run.train.save_each_epoch and trainer.step != self.last_saved_step:
            self.save(trainer)

    def start(self, trainer) -> None:
        """Before training: checkpoints later than where this run starts belong to a run it
        replaces, and are set aside (rank 0; every rank waits)."""
        if self.dist.is_main:
            set_aside_newer(self.output_dir, trainer.step)
        barrier()

    def trainer_state(self, trainer) -> dict:
        """Where the run stands, as tensors and plain values (loadable with weights_only)."""
        return {"step": trainer.step, "epoch": trainer.epoch,
                "best_eval_loss": trainer.best_eval_loss, "best_epoch": trainer.best_epoch,
                "sampler": self.sampler.position(trainer.epoch, trainer.steps_in_epoch),
                "scheduler": self.scheduler.state_dict(),
                "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler else None}

    def save(self, trainer) -> Path:
        rng = rng_state()  # first: the state at the step boundary, whatever saving draws
        final = checkpoints_dir(self.output_dir) / step_dir_name(trainer.step)
        tmp = tmp_dir_for(final)
        if self.dist.is_main:
            remove_leftovers(self.output_dir)
            fresh_tmp_dir(final)
        barrier()
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.options)
        error = None
        try:
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
            torch.save(rng, tmp / f"rng-rank{self.dist.rank}.pt")
            if self.dist.is_main:
                torch.save(self.trainer_state(trainer), tmp / TRAINER_STATE)
        # disk full, quota, lost mount: OSError, or DCP's CheckpointException, or RuntimeError
        # from torch's zip writer (which turns a failed write into "unexpected pos")
        except (OSError, RuntimeError, CheckpointException) as failure:
            error = failure
        # every rank learns whether any failed, so all stop together (none waits forever)
        (failed,) = all_reduce_sum([int(error is not None)], self.dist.device)
        if failed:
            self.abandon(tmp, final, error)
        if self.dist.is_main:
            try:
                self.write_manifest(tmp, trainer)
                publish(tmp, final, aside_suffix=REPLACED)
            except OSError as failure:
                self.abandon(tmp, final, failure)
            self.prune()
        barrier()
        self.last_saved_step = trainer.step
        return final

    def write_manifest(self, tmp: Path, trainer) -> None:
        files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps(
            {"step": trainer.step, "epoch": trainer.epoch, "world_size": self.dist.world_size,
             "model_name": self.run.train.model_name, "global_batch": self.sampler.step_size,
             "files": files}, indent=1))

    def abandon(self, tmp: Path, final: Path, error: BaseException | None) -> None:
        """A save failed: remove its half-written directory and stop with what happened."""
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(self.output_dir)
        raise CheckpointSaveError(
            f"saving checkpoint {final.name} failed ({save_failure(error)}); the newest complete "
            f"checkpoint, {previous or 'none'}, is untouched. Free space (or fix the file "
            "system) and rerun with --resume_from_checkpoint auto") from (
                error)

    def prune(self) -> None:
        keep = self.run.train.save_total_limit
        if not keep:
            return
        complete = [path for _, path in step_dirs(self.output_dir) if save_finished(path)]
        for old in complete[:-keep]:
            remove_checkpoint(old)

    def restore(self, trainer, path: Path) -> None:
        """Load everything ``save`` wrote; the run then continues at the next step."""
        require_intact(path)
        saved = read_manifest(path)
        if saved["model_name"] != self.run.train.model_name:
            raise ValueError(f"{path} was saved for model {saved['model_name']!r}, this run "
                             f"trains {self.run.train.model_name!r}")
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.options)
        mismatches = shape_mismatches(path, model_state)
        if mismatches:
            shown = "\n  ".join(mismatches[:8]) + ("\n  ..." if len(mismatches) > 8 else "")
            raise CheckpointError(
                f"{path} holds another model than this run builds ({len(mismatches)} tensors "
                f"differ):\n  {shown}\nResume with the model and adapter settings (--use_peft, "
                "--lora_config.r, target modules, ...) the checkpoint was saved with, or start "
                "in a new --output_dir")
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=self.options)
        trainer_state = load_plain(path / TRAINER_STATE)
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.sampler.load_state_dict(trainer_state["sampler"])
        if self.grad_scaler and trainer_state["grad_scaler"]:
            self.grad_scaler.load_state_dict(trainer_state["grad_scaler"])
        trainer.step, trainer.epoch = trainer_state["step"], trainer_state["epoch"]
        # the best epoch's model is saved already; a later epoch replaces it only if it is better
        # (checkpoints written before this was recorded know no best: the next epoch saves)
        trainer.best_eval_loss = trainer_state.get("best_eval_loss", math.inf)
        trainer.best_epoch = trainer_state.get("best_epoch", 0)
        data = trainer_state["sampler"]
        trainer.steps_in_epoch = data["steps"] if data["epoch"] == trainer.epoch else 0
        rng_file = path / f"rng-rank{self.dist.rank}.pt"
        if saved["world_size"] == self.dist.world_size and rng_file.is_file():
            set_rng_state(load_plain(rng_file))
        if self.dist.is_main:
            print(f"resumed from {path} at step {trainer.step}", flush=True)


def rng_state() -> dict:
    """This rank's random generators: Python's, torch's CPU one and every CUDA device's
    (dropout draws from torch's). The data order has its own seeded generators."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resume_settings(t, world_size: int) -> None:
    """The checkpoint ``--resume_from_checkpoint`` names is there, intact, and of this run's
    global batch (the data position would not mean the same samples otherwise)."""
    try:
        checkpoint = choose_checkpoint(t.resume_from_checkpoint, t.output_dir)
    except CheckpointError as error:
        raise ConfigError(str(error)) from error
    if checkpoint:
        saved = read_manifest(checkpoint).get("global_batch")
        problem = saved and global_batch_problem(saved, t.batch_size_training, world_size,
                                                 t.gradient_accumulation_steps)
        if problem:
            raise ConfigError(f"{checkpoint} was {problem}")
