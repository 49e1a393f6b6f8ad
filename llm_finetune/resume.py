"""Training checkpoints that a run can resume from exactly.

Every ``save_steps`` optimizer steps the run writes ``output_dir/checkpoints/step-NNNNNNNN/``:
model and optimizer through ``torch.distributed.checkpoint`` (every rank writes its shards; a
PEFT run stores only the trainable adapter), the step, epoch, learning-rate schedule, gradient
scaler and data position (optimizer steps done in the epoch, counted by the trainer), and each
rank's RNG state at the step boundary. The directory is written as ``step-NNNNNNNN.tmp`` and
renamed only after every rank finished and rank 0 wrote ``MANIFEST.json`` (step, world size,
files and sizes), so a run killed while saving leaves no checkpoint that
``--resume_from_checkpoint auto`` would pick; a checkpoint is checked against its manifest before
use, and ``auto`` falls back past damaged ones. ``save_total_limit`` keeps the newest K.

Our state files hold tensors and plain values only and load with ``weights_only=True``; DCP's
index (a pickle) is read first with an unpickler that admits only its own classes.
"""

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from llm_finetune.atomic_dir import fresh_tmp_dir, publish, tmp_dir_for
from llm_finetune.distributed import DistInfo, all_reduce_sum, barrier

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.pt"
REQUIRED_FILES = (".metadata", TRAINER_STATE)  # DCP's index, and where the run stands
STEP_DIR = re.compile(r"step-(\d+)")
REPLACED = ".replaced"  # a checkpoint being replaced by a new save of the same step


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says which, why, and what to do."""


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed; the half-written directory is gone, older ones are kept."""


def checkpoints_dir(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_dirs(output_dir: str) -> list[tuple[int, Path]]:
    """(step, directory) of every directory named exactly ``step-N``, oldest first: names with
    a suffix (``.tmp`` being written, ``.deleting`` being removed) are never checkpoints."""
    found = []
    for path in checkpoints_dir(output_dir).glob("step-*"):
        match = STEP_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_finished(path: Path) -> bool:
    """Whether the save of ``path`` got to its end: rank 0 writes the manifest last, after every
    rank's files. (Finished is not intact: ``checkpoint_problem`` also checks the files.)"""
    return (Path(path) / MANIFEST).is_file()


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or None: its manifest must parse, and every file
    it lists must exist with the recorded size (a truncated or deleted shard shows here, not
    as a zip error deep inside loading)."""
    path = Path(path)
    if not save_finished(path):
        return f"not a complete checkpoint (no {MANIFEST}: its save never finished)"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files, _ = manifest["files"], int(manifest["step"])
    except (ValueError, KeyError, TypeError) as error:
        return f"its {MANIFEST} is unreadable ({type(error).__name__}: {error}; truncated?)"
    for name in REQUIRED_FILES:
        if name not in files:
            return f"its {MANIFEST} lists no {name}"
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing ({MANIFEST} lists it with {size} bytes)"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {MANIFEST} records {size} (truncated?)"
    return None


def say(message: str) -> None:
    """Print once per job (rank 0), also before the process group exists."""
    if os.environ.get("RANK", "0") == "0":
        print(message, flush=True)


def latest_checkpoint(output_dir: str, report: bool = False) -> Path | None:
    """The newest intact checkpoint in ``output_dir``, or None. ``report``: name each newer
    damaged one passed over, and why."""
    for _, path in reversed(step_dirs(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if report:
            say(f"warning: skipping checkpoint {path}: {problem}; trying the one before")
    return None


def require_intact(path: Path) -> None:
    problem = checkpoint_problem(path)
    if problem is None:
        return
    intact = [p.name for _, p in step_dirs(str(Path(path).parent.parent))
              if checkpoint_problem(p) is None]
    others = f"intact ones there: {', '.join(intact)}" if intact else "none there is intact"
    raise CheckpointError(f"--resume_from_checkpoint {path}: {problem}. Resume from another "
                          f"checkpoint ({others}), or pass --resume_from_checkpoint auto to take "
                          "the newest intact one")


def choose_checkpoint(choice: str, output_dir: str, report: bool = False) -> Path | None:
    """The checkpoint ``--resume_from_checkpoint`` names, checked: ``auto`` is the newest
    intact one in output_dir (None: start fresh), a path must be intact (else CheckpointError)."""
    if not choice:
        return None
    if choice == "auto":
        return latest_checkpoint(output_dir, report=report)
    require_intact(Path(choice))
    return Path(choice)


def resolve_resume(run) -> Path | None:
    return choose_checkpoint(run.train.resume_from_checkpoint, run.train.output_dir, report=True)


def read_manifest(path) -> dict:
    """What a complete checkpoint records: step, epoch, world size, model, global batch, files."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except ValueError as error:
        raise CheckpointError(f"{Path(path) / MANIFEST} is unreadable ({error}; truncated?): "
                              "resume from another checkpoint") from error


def checkpoint_step(path: Path) -> int:
    return read_manifest(path)["step"]


def load_plain(file: Path):
    """Load one of our state files without running code: ``weights_only=True`` admits tensors
    and plain values only, so a planted pickle payload is refused instead of executed."""
    try:
        return torch.load(file, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        reason = str(error).strip().splitlines()[0]
        raise CheckpointError(f"{file}: refused to load ({reason}). Checkpoint state files hold "
                              "only tensors and plain values; this one does not (damaged, or "
                              "replaced by someone). Resume from another checkpoint") from error


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


def remove_checkpoint(path: Path) -> None:
    """Rename, then delete: a run killed while deleting leaves a directory no longer named
    step-N, never a half-deleted checkpoint that ``auto`` would pick."""
    doomed = path.with_name(path.name + ".deleting")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(output_dir: str) -> None:
    """Directories a killed save or prune left behind (never picked, only taking space)."""
    for suffix in (".deleting", REPLACED):
        for path in checkpoints_dir(output_dir).glob(f"step-*{suffix}"):
            shutil.rmtree(path, ignore_errors=True)


def set_aside_newer(output_dir: str, start_step: int) -> Path | None:
    """Move checkpoints after ``start_step`` (another timeline: the run this one replaces
    went further) to ``checkpoints/abandoned-after-step-N[-k]/``, where ``auto`` never looks:
    the new timeline writes its own. Returns where they went, or None."""
    newer = [path for step, path in step_dirs(output_dir) if step > start_step]
    if not newer:
        return None
    base = checkpoints_dir(output_dir) / f"abandoned-after-{step_dir_name(start_step)}"
    aside, k = base, 1
    while aside.exists():
        aside, k = base.with_name(f"{base.name}-{k}"), k + 1
    aside.mkdir()
    for path in newer:
        os.replace(path, aside / path.name)
    say(f"this run continues from step {start_step}: {len(newer)} later checkpoint(s) of the "
        f"run it replaces moved to {aside} (never resumed from by auto; delete when unneeded)")
    return aside


class IndexUnpickler(pickle.Unpickler):
    """Reads DCP's ``.metadata`` (a pickle) admitting only what a checkpoint index is made of:
    DCP's metadata classes, tensor sizes, dtypes and layouts, paths. A planted payload names
    some other callable and is refused before anything runs."""

    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib._local", "PosixPath"),
               ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        found = super().find_class(module, name) if self.allowed(module, name) else None
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")
        return found

    def allowed(self, module: str, name: str) -> bool:
        if (module, name) in self.ALLOWED:
            return True
        if module == "torch":
            return isinstance(getattr(torch, name, None), torch.dtype)
        if module == "torch.distributed.checkpoint.metadata":
            import torch.distributed.checkpoint.metadata as metadata

            value = getattr(metadata, name, None)
            return isinstance(value, type) and value.__module__ == module
        return False


def read_index(path: Path):
    """DCP's index of a checkpoint (what each tensor is, where it is stored), read safely; torch
    reads the same file again with plain pickle inside ``dcp.load``, after this check."""
    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as stream:
            return IndexUnpickler(stream).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as error:
        raise CheckpointError(f"{file}: refused to load ({error}). A checkpoint index holds only "
                              "DCP's metadata; this one does not (damaged, or replaced by "
                              "someone). Resume from another checkpoint") from error


def shape_mismatches(path: Path, model_state: dict) -> list[str]:
    """Model tensors whose shape differs between the checkpoint and this run's model, or that
    only one of them has (another model, or other adapter settings)."""
    stored = read_index(path).state_dict_metadata
    stored_model = {key[len("model."):]: meta for key, meta in stored.items()
                    if key.startswith("model.")}
    problems = []
    for key, value in model_state.items():
        meta = stored_model.get(key)
        if meta is None:
            problems.append(f"{key}: not in the checkpoint")
        elif hasattr(meta, "size") and tuple(meta.size) != tuple(value.size()):
            problems.append(f"{key}: {list(meta.size)} in the checkpoint, "
                            f"{list(value.size())} in this model")
    problems += [f"{key}: in the checkpoint, not in this model"
                 for key in stored_model if key not in model_state]
    return problems


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
