"""Resume: a run stopped after step k and resumed continues the same loss curve; a run killed
with SIGKILL under torchrun resumes from its newest complete checkpoint, by hand or through
torchrun's restarts, and on another world size; a full disk mid-run keeps the last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_finetune import finetuning
from llm_finetune.config_utils import ConfigError, build_run_config, validate
from llm_finetune.resume import latest_checkpoint
from tests.helpers import FAST, REPO

# StepLR and warm-up depend on the step alone, so stopping early (a smaller max_train_step)
# does not change the schedule of the steps that ran
RUN = dict(FAST, max_train_step=10, run_validation=False, lr_scheduler="step", warmup_steps=3)


def step_losses(summary) -> list[float]:
    return [m["loss"] for m in summary["metrics"] if "loss" in m]


@pytest.mark.parametrize("extra", [
    {},  # full fine-tuning
    {"use_peft": True, "lora_config.lora_dropout": 0.1},  # dropout: the RNG state must resume
])
def test_stopped_and_resumed_run_continues_the_same_curve(extra, tiny_model_dir, tmp_path):
    kwargs = {**RUN, **extra, "model_name": str(tiny_model_dir)}
    straight = step_losses(finetuning.main(**kwargs, output_dir=str(tmp_path / "straight")))
    # the "interrupted" run: same settings, stopped after step 6 (checkpoints at 3 and 6)
    first = finetuning.main(**{**kwargs, "max_train_step": 6}, save_steps=3,
                            output_dir=str(tmp_path / "resumed"))
    assert step_losses(first) == straight[:6]
    resumed = finetuning.main(**kwargs, resume_from_checkpoint="auto",
                              output_dir=str(tmp_path / "resumed"))
    assert resumed["steps"] == 10
    assert step_losses(resumed) == straight[6:]  # bitwise: one process on CPU
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 11))


def test_save_total_limit_and_incomplete_checkpoints(tiny_model_dir, tmp_path):
    finetuning.main(**RUN, model_name=str(tiny_model_dir), save_steps=2, save_total_limit=2,
                    output_dir=str(tmp_path))
    kept = sorted(d.name for d in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-00000008", "step-00000010"]
    # a save killed half-way leaves a .tmp directory (or one without manifest): never picked
    (tmp_path / "checkpoints" / "step-00000012.tmp").mkdir()
    (tmp_path / "checkpoints" / "step-00000014").mkdir()
    assert latest_checkpoint(str(tmp_path)).name == "step-00000010"


def test_resume_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        validate(build_run_config(resume_from_checkpoint=str(tmp_path)), world_size=1, cuda=False)
    finetuning.main(**{**RUN, "max_train_step": 2}, model_name=str(tiny_model_dir), save_steps=2,
                    output_dir=str(tmp_path))
    with pytest.raises(ValueError, match="was saved for model"):
        finetuning.main(**RUN, resume_from_checkpoint=str(tmp_path / "checkpoints" / "step-00000002"),
                        output_dir=str(tmp_path / "other"))


def torchrun_cmd(model_dir, out, *extra, engine="--enable_fsdp"):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "llm_finetune.finetuning", engine, "--model_name", str(model_dir),
            "--output_dir", str(out), "--max_train_step", "40", "--batch_size_training", "2",
            "--run_validation", "False", "--save_model", "False", "--num_workers_dataloader", "0",
            "--lr_scheduler", "cosine", *extra]


def run_losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def straight_fsdp(tiny_model_dir, tmp_path_factory):
    """An uninterrupted 2-rank FSDP run of 40 steps, with a checkpoint at step 20."""
    out = tmp_path_factory.mktemp("straight")
    subprocess.run(torchrun_cmd(tiny_model_dir, out, "--save_steps", "20"), env=ENV, check=True,
                   capture_output=True, timeout=300)
    return out


def assert_continues(got: dict, expected: dict, resumed_from: int, rel=1e-5) -> None:
    assert 0 < resumed_from < 40 and sorted(got) == list(range(1, 41))
    after = [s for s in expected if s > resumed_from]
    assert [got[s] for s in after] == pytest.approx([expected[s] for s in after], rel=rel)


def wait_for_checkpoint(job, out) -> None:
    deadline = time.time() + 240
    while latest_checkpoint(str(out)) is None and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert latest_checkpoint(str(out)) is not None, "the run never saved a checkpoint"


def test_fsdp_run_killed_with_sigkill_resumes(straight_fsdp, tiny_model_dir, tmp_path):
    out = tmp_path / "killed"
    job = subprocess.Popen(torchrun_cmd(tiny_model_dir, out, "--save_steps", "5"), env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    wait_for_checkpoint(job, out)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and both ranks, no clean exit
    job.wait()
    checkpoint = latest_checkpoint(str(out))
    subprocess.run(torchrun_cmd(tiny_model_dir, out, "--save_steps", "5",
                                "--resume_from_checkpoint", "auto"),
                   env=ENV, check=True, capture_output=True, timeout=300)
    # metrics.jsonl is one curve: the steps the killed run did after its checkpoint are
    # replaced by the resumed run's
    assert_continues(run_losses(out), run_losses(straight_fsdp),
                     int(checkpoint.name.split("-")[1]))


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_torchrun_max_restarts_resumes_by_itself(straight_fsdp, tiny_model_dir, tmp_path):
    """One rank is SIGKILLed mid-run; torchrun restarts the job (--max_restarts 1), which picks
    up the newest checkpoint through --resume_from_checkpoint auto and finishes the curve."""
    out = tmp_path / "restarted"
    cmd = torchrun_cmd(tiny_model_dir, out, "--save_steps", "5", "--resume_from_checkpoint", "auto")
    cmd.insert(cmd.index("--standalone"), "--max_restarts=1")
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    wait_for_checkpoint(job, out)
    checkpoint = latest_checkpoint(str(out))
    workers = children(job.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    log, _ = job.communicate(timeout=300)
    assert job.returncode == 0, log[-4000:]
    assert "resumed from" in log
    assert_continues(run_losses(out), run_losses(straight_fsdp),
                     int(checkpoint.name.split("-")[1]))


def test_resume_on_another_world_size(straight_fsdp, tiny_model_dir, tmp_path):
    """The 2-rank FSDP checkpoint of step 20 resumes in one process without FSDP (DCP reshards
    the model and optimizer) with the same global batch, and continues the 2-rank curve; a
    different global batch is refused before anything loads."""
    checkpoint = straight_fsdp / "checkpoints" / "step-00000020"
    settings = dict(model_name=str(tiny_model_dir), max_train_step=40, run_validation=False,
                    save_model=False, num_workers_dataloader=0, lr_scheduler="cosine",
                    resume_from_checkpoint=str(checkpoint), output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="saved with 4 samples per optimizer step"):
        finetuning.main(**settings, batch_size_training=2)
    resumed = finetuning.main(**settings, batch_size_training=2, gradient_accumulation_steps=2)
    got = {m["step"]: m["loss"] for m in resumed["metrics"] if "loss" in m}
    expected = run_losses(straight_fsdp)
    assert sorted(got) == list(range(21, 41))
    assert [got[s] for s in got] == pytest.approx([expected[s] for s in got], rel=1e-5)


def test_ddp_run_checkpoints_and_resumes(straight_fsdp, tiny_model_dir, tmp_path):
    """DDP (a replica per rank) trains the same curve as FSDP, and its step checkpoint resumes
    into the rest of that curve."""
    out = tmp_path / "ddp"
    subprocess.run(torchrun_cmd(tiny_model_dir, out, "--save_steps", "20", engine="--enable_ddp"),
                   env=ENV, check=True, capture_output=True, timeout=300)
    expected = run_losses(straight_fsdp)
    assert_continues(run_losses(out), expected, resumed_from=1)
    resumed = tmp_path / "ddp-resumed"
    subprocess.run(torchrun_cmd(tiny_model_dir, resumed, "--resume_from_checkpoint",
                                str(out / "checkpoints" / "step-00000020"), engine="--enable_ddp"),
                   env=ENV, check=True, capture_output=True, timeout=300)
    got = run_losses(resumed)
    assert sorted(got) == list(range(21, 41))
    assert [got[s] for s in got] == pytest.approx([expected[s] for s in got], rel=1e-5)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path,
                                                              monkeypatch):
    import torch.distributed.checkpoint as dcp

    real_save, calls = dcp.save, []

    def save_until_disk_full(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            real_save(*args, **kwargs)  # half the files written, then the disk is full
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(dcp, "save", save_until_disk_full)
    with pytest.raises(OSError, match="saving checkpoint step-00000004 failed .*No space left"
                                      ".*step-00000002, is untouched"):
        finetuning.main(**RUN, model_name=str(tiny_model_dir), save_steps=2,
                        output_dir=str(tmp_path))
    assert sorted(d.name for d in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]
    assert latest_checkpoint(str(tmp_path)).name == "step-00000002"


def test_full_disk_and_unwritable_output_fail_before_training(tiny_model_dir, tmp_path,
                                                             monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(OSError, match="GiB free, the run's checkpoints need"):
        finetuning.main(**RUN, model_name=str(tiny_model_dir), save_steps=5,
                        output_dir=str(tmp_path / "full"))
    assert not (tmp_path / "full" / "metrics.jsonl").exists(), "training must not have started"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is not writable"):  # before the model loads
        finetuning.main(**RUN, model_name=str(tiny_model_dir), output_dir=str(blocker / "out"))


def test_checkpoint_each_epoch_resumes_at_the_next_epoch(tiny_model_dir, tmp_path):
    """--save_each_epoch: a checkpoint after each epoch's evaluation; resuming from the first
    one runs epochs 2 and 3 exactly as the uninterrupted run did, evaluations included."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "",
                                        "output": f"{2 * i + 1}"}) + "\n" for i in range(60)))
    kwargs = dict(FAST, model_name=str(tiny_model_dir), dataset="file_dataset", num_epochs=3,
                  max_train_step=0, batch_size_training=8, lr_scheduler="step",
                  **{"file_dataset.data_files": str(data), "file_dataset.val_split": 0.2})
    straight = finetuning.main(**kwargs, save_each_epoch=True, output_dir=str(tmp_path / "a"))
    epochs = sorted(d.name for d in (tmp_path / "a" / "checkpoints").iterdir())
    assert epochs == [f"step-{6 * k:08d}" for k in (1, 2, 3)]  # 48 rows / 8 = 6 steps
    resumed = finetuning.main(**kwargs, output_dir=str(tmp_path / "b"),
                              resume_from_checkpoint=str(tmp_path / "a" / "checkpoints" / epochs[0]))
    assert step_losses(resumed) == step_losses(straight)[6:]
    assert resumed["eval_loss"] == straight["eval_loss"][1:]


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    with pytest.raises(FloatingPointError, match=r"loss is nan at step (\d+): stopping; lower --lr"):
        finetuning.main(**{**RUN, "lr": 1e6, "max_train_step": 40}, model_name=str(tiny_model_dir),
                        save_steps=1, output_dir=str(tmp_path))
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last_good = lines[-1]["step"]
    assert latest_checkpoint(str(tmp_path)).name == f"step-{last_good:08d}"
    assert not any(d.name.endswith(".tmp") for d in (tmp_path / "checkpoints").iterdir())
