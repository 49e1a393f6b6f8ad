"""Write a directory under a temporary name, then rename it into place: a crash while writing
never leaves a half-written directory under the final name. Used by training checkpoints
(training_checkpoint.py) and the final export (export.py)."""

import os
import shutil
from pathlib import Path


def tmp_dir_for(final: Path) -> Path:
    """The temporary name ``final`` is written under: ``<final>.tmp``."""
    return final.with_name(final.name + ".tmp")


def fresh_tmp_dir(final: Path) -> Path:
    """Create ``<final>.tmp`` empty (a killed earlier attempt's leftover is removed first)."""
    tmp = tmp_dir_for(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path, aside_suffix: str = ".old") -> None:
    """Rename a finished ``tmp`` to ``final``. A directory already at ``final`` is renamed
    aside (``<final><aside_suffix>``) first and removed only afterwards: under the final name
    there is always one whole directory, or none."""
    aside = final.with_name(final.name + aside_suffix)
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def publish_files(tmp: Path, directory: Path) -> None:
    """Move every file of a finished ``tmp`` into ``directory``, one rename each, then remove
    ``tmp``: for a directory that holds other things (a PEFT adapter goes straight into
    output_dir, beside the run's metrics and checkpoints) and so cannot be renamed whole. Every
    file is replaced whole, never half-written; the weights are one file."""
    directory.mkdir(parents=True, exist_ok=True)
    for file in sorted(tmp.iterdir()):
        os.replace(file, directory / file.name)
    tmp.rmdir()
