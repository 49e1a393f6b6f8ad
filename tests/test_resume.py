"""Resume: a run stopped after step k and resumed continues the same loss curve; a run killed
with SIGKILL under torchrun resumes from its newest complete checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

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


def torchrun_cmd(model_dir, out, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "llm_finetune.finetuning", "--enable_fsdp", "--model_name", str(model_dir),
            "--output_dir", str(out), "--max_train_step", "40", "--batch_size_training", "2",
            "--run_validation", "False", "--save_model", "False", "--num_workers_dataloader", "0",
            "--lr_scheduler", "cosine", *extra]


def run_losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


def test_fsdp_run_killed_with_sigkill_resumes(tiny_model_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    subprocess.run(torchrun_cmd(tiny_model_dir, tmp_path / "straight"), env=env, check=True,
                   capture_output=True, timeout=300)
    expected = run_losses(tmp_path / "straight")
    out = tmp_path / "killed"
    job = subprocess.Popen(torchrun_cmd(tiny_model_dir, out, "--save_steps", "5"), env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + 240
    while latest_checkpoint(str(out)) is None and job.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and both ranks, no clean exit
    job.wait()
    checkpoint = latest_checkpoint(str(out))
    assert checkpoint is not None
    subprocess.run(torchrun_cmd(tiny_model_dir, out, "--save_steps", "5",
                                "--resume_from_checkpoint", "auto"),
                   env=env, check=True, capture_output=True, timeout=300)
    got = run_losses(out)
    resumed_from = int(checkpoint.name.split("-")[1])
    assert resumed_from < 40
    assert max(got) == 40
    after = [s for s in expected if s > resumed_from]
    assert [got[s] for s in after] == pytest.approx([expected[s] for s in after], rel=1e-5)


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
    with pytest.raises(OSError, match="is not writable"):
        finetuning.main(**RUN, model_name=str(tiny_model_dir), output_dir=str(blocker / "out"))
