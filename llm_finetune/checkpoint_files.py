"""Training checkpoints on disk: where they are, whether one is intact, which one to resume
from, what it records, and removing or setting them aside. Nothing here needs a model, so config
validation can check the checkpoint a run will resume from without importing the code that saves
and restores one (``training_checkpoint``).

A checkpoint is ``output_dir/checkpoints/step-NNNNNNNN/``, complete once it holds
``MANIFEST.json`` (its files and their sizes); a checkpoint is checked against its manifest
before use, and ``--resume_from_checkpoint auto`` falls back past damaged ones.

Our state files hold tensors and plain values only and load with ``weights_only=True``; DCP's
index (a pickle) is read first with an unpickler that admits only its own classes.
"""

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

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
