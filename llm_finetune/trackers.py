"""Experiment trackers: TensorBoard scalars (``--use_tensorboard``) and Weights & Biases
(``--use_wandb`` with ``wandb_config``), fed the same records as ``metrics.jsonl``, on rank 0.

Both packages are optional; ``validate`` refuses the flag before anything loads when the
package is missing. Training records go under ``train/``, evaluations under ``eval/``.
"""

import importlib.util
from pathlib import Path

from llm_finetune.errors import ConfigError

WANDB_RUN_ID = "wandb_run_id"  # in output_dir: the wandb run a resumed run continues


def start_wandb(run, resumed: bool):
    """A new wandb run, or on resume the one this output_dir logged to (its id is kept in
    ``output_dir/wandb_run_id``), so a resumed run continues the same charts."""
    import wandb

    t, w = run.train, run.wandb
    id_file = Path(t.output_dir) / WANDB_RUN_ID
    resume = {}
    if resumed and id_file.is_file():
        resume = dict(id=id_file.read_text().strip(), resume="allow")
    started = wandb.init(project=w.project, entity=w.entity or None, job_type=w.job_type or None,
                         tags=w.tags, group=w.group or None, notes=w.notes or None,
                         mode=w.mode or None, dir=t.output_dir, config=run.to_dict(), **resume)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(started.id + "\n")
    return started


class Trackers:
    def __init__(self, run, enabled: bool, resumed_step: int | None = None):
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        t = run.train
        if t.use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run continues the same curve: events logged after the checkpoint's
            # step are dropped (purge_step drops steps >= it; the checkpoint's own step stays)
            purge_step = resumed_step + 1 if resumed_step is not None else None
            self.tensorboard = SummaryWriter(str(Path(t.output_dir) / "tensorboard"),
                                             purge_step=purge_step)
        if t.use_wandb:
            self.wandb = start_wandb(run, resumed=resumed_step is not None)

    def log(self, record: dict) -> None:
        prefix = "eval" if "eval_loss" in record else "train"
        values = {f"{prefix}/{key}": value for key, value in record.items()
                  if key not in ("step", "epoch") and isinstance(value, (int, float))}
        if self.tensorboard is not None:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(values, step=record["step"])
        if "samples" in record:
            self.log_samples(record)

    def log_samples(self, record: dict) -> None:
        """``--eval_prompts``' answers: a text panel in TensorBoard, a table in wandb."""
        rows = [(s["prompt"], s["answer"]) for s in record["samples"]]
        if self.tensorboard is not None:
            text = "\n\n".join(f"**{prompt}**\n\n{answer}" for prompt, answer in rows)
            self.tensorboard.add_text("eval/samples", text, record["step"])
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["prompt", "answer"], data=[list(r) for r in rows])
            self.wandb.log({"eval/samples": table}, step=record["step"])

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_tracker_packages(t) -> None:
    """A tracker asked for is installed, before the run starts rather than when it logs."""
    for flag, package in (("use_tensorboard", "tensorboard"), ("use_wandb", "wandb")):
        if getattr(t, flag) and importlib.util.find_spec(package) is None:
            raise ConfigError(f"--{flag} needs the {package} package, which is not installed: "
                              f"pip install {package} (or drop --{flag})")
