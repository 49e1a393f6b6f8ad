"""Training checkpoints that a run can resume from exactly.

Every ``save_steps`` optimizer steps the run writes ``output_dir/checkpoints/step-NNNNNNNN/``:
model and optimizer through ``torch.distributed.checkpoint`` (every rank writes its shards; a
PEFT run stores only the trainable adapter), the step, epoch, learning-rate schedule, gradient
scaler and data-sampler position, and each rank's RNG state. The directory is written as
``step-NNNNNNNN.tmp`` and renamed only after every rank finished and rank 0 wrote
``MANIFEST.json`` (step, world size, files and sizes), so a run killed while saving leaves no
checkpoint that ``--resume_from_checkpoint auto`` would pick. ``save_total_limit`` keeps the
newest K.
"""

import json
import os
import random
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from llm_finetune.distributed import DistInfo, barrier

MANIFEST = "MANIFEST.json"


def checkpoints_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str) -> Path | None:
    """The newest complete checkpoint (one with a manifest), or None."""
    complete = [d for d in checkpoints_dir(output_dir).glob("step-*")
                if d.is_dir() and not d.name.endswith(".tmp") and (d / MANIFEST).is_file()]
    return max(complete, key=lambda d: int(d.name.split("-")[1]), default=None)


def read_manifest(path) -> dict:
    """What a complete checkpoint records: step, epoch, world size, model, global batch, files."""
    return json.loads((Path(path) / MANIFEST).read_text())


def checkpoint_step(path: Path) -> int:
    return read_manifest(path)["step"]


def resolve_resume(run) -> Path | None:
    """``auto``: the newest complete checkpoint in output_dir (None: start fresh)."""
    choice = run.train.resume_from_checkpoint
    if not choice:
        return None
    if choice == "auto":
        return latest_checkpoint(run.train.output_dir)
    return Path(choice)


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

    def maybe_save(self, trainer) -> None:
        every = self.run.train.save_steps
        if every and trainer.step % every == 0:
            self.save(trainer)

    def epoch_end(self, trainer) -> None:
        """``save_each_epoch``: a checkpoint after each epoch (and its evaluation), unless the
        last step's checkpoint is already this one."""
        if self.run.train.save_each_epoch and trainer.step != self.last_saved_step:
            self.save(trainer)

    def save(self, trainer) -> Path:
        final = checkpoints_dir(self.run.train.output_dir) / f"step-{trainer.step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.options)
        try:
            dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
            torch.save(rng_state(), tmp / f"rng-rank{self.dist.rank}.pt")
        except OSError as error:  # disk full, quota, lost mount: say so, keep the last one
            shutil.rmtree(tmp, ignore_errors=True)
            previous = latest_checkpoint(self.run.train.output_dir)
            raise OSError(error.errno, f"saving checkpoint {final.name} failed ({error}); "
                          f"the newest complete checkpoint, {previous or 'none'}, is untouched. "
                          "Free space and rerun with --resume_from_checkpoint auto") from error
        barrier()
        if self.dist.is_main:
            torch.save({"step": trainer.step, "epoch": trainer.epoch,
                        "sampler": self.sampler.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                        "grad_scaler": self.grad_scaler.state_dict() if self.grad_scaler else None},
                       tmp / "trainer_state.pt")
            files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
            (tmp / MANIFEST).write_text(json.dumps(
                {"step": trainer.step, "epoch": trainer.epoch,
                 "world_size": self.dist.world_size, "model_name": self.run.train.model_name,
                 "global_batch": self.sampler.step_size,
                 "files": files}, indent=1))
            os.replace(tmp, final)
            self.prune()
        barrier()
        self.last_saved_step = trainer.step
        return final

    def prune(self) -> None:
        keep = self.run.train.save_total_limit
        if not keep:
            return
        complete = sorted((d for d in checkpoints_dir(self.run.train.output_dir).glob("step-*")
                           if (d / MANIFEST).is_file()), key=lambda d: d.name)
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def restore(self, trainer, path: Path) -> None:
        """Load everything ``save`` wrote; the run then continues at the next step."""
        manifest = path / MANIFEST
        if not manifest.is_file():
            raise ValueError(f"{path} is not a complete checkpoint (no {MANIFEST}); pass a "
                             "step-NNNNNNNN directory, or --resume_from_checkpoint auto")
        saved = read_manifest(path)
        if saved["model_name"] != self.run.train.model_name:
            raise ValueError(f"{path} was saved for model {saved['model_name']!r}, this run "
                             f"trains {self.run.train.model_name!r}")
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self.options)
        state = {"model": model_state, "optimizer": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=self.options)
        trainer_state = torch.load(path / "trainer_state.pt", weights_only=False)
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self.sampler.load_state_dict(trainer_state["sampler"])
        if self.grad_scaler and trainer_state["grad_scaler"]:
            self.grad_scaler.load_state_dict(trainer_state["grad_scaler"])
        trainer.step, trainer.epoch = trainer_state["step"], trainer_state["epoch"]
        rng_file = path / f"rng-rank{self.dist.rank}.pt"
        if saved["world_size"] == self.dist.world_size and rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=False))
        if self.dist.is_main:
            print(f"resumed from {path} at step {trainer.step}", flush=True)


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
