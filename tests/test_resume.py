"""Resume: a run stopped after step k and resumed continues the same loss curve, bit for bit on
the default path too (a prefetching loader worker, LoRA dropout, accumulation); a run killed
with SIGKILL under torchrun resumes from its newest complete checkpoint, by hand or through
torchrun's restarts, and on another world size. Checkpoints under real failures: a write error
inside DCP, SIGKILL while pruning, damaged files (auto falls back), an older checkpoint resumed
in the same output_dir, a torn metrics line, a planted pickle, another model's shapes."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_finetune import finetuning
from llm_finetune.config_utils import ConfigError, build_run_config
from llm_finetune.preflight import validate
from llm_finetune.checkpoint_files import checkpoint_problem, latest_checkpoint
from tests.helpers import FAST, REPO, TINY_RECIPE, recipe_flags

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
            *recipe_flags("batch_size_training"),
            "--output_dir", str(out), "--max_train_step", "40", "--batch_size_training", "2",
            "--run_validation", "False", "--save_model", "False", "--num_workers_dataloader", "0",
            "--lr_scheduler", "cosine", *extra]


def run_losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
STEP_NAME = re.compile(r"step-\d{8}")


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
    # max_train_step counts micro-batches per rank (llama-recipes): the 2-rank run's 40 steps
    # are 80 micro-batches of a process accumulating 2
    settings = dict(TINY_RECIPE, model_name=str(tiny_model_dir), max_train_step=80,
                    run_validation=False, save_model=False, num_workers_dataloader=0,
                    lr_scheduler="cosine", resume_from_checkpoint=str(checkpoint),
                    output_dir=str(tmp_path))
    settings.pop("batch_size_training")
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
    with pytest.raises(ConfigError, match="GiB free, the run's checkpoints need"):
        finetuning.main(**RUN, model_name=str(tiny_model_dir), save_steps=5,
                        output_dir=str(tmp_path / "full"))
    assert not (tmp_path / "full" / "metrics.jsonl").exists(), "training must not have started"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is not writable"):  # before the model loads
        finetuning.main(**RUN, model_name=str(tiny_model_dir), output_dir=str(blocker / "out"))


def test_room_needed_counts_the_checkpoints_a_resumed_run_finds(tmp_path):
    """The disk check asks for the checkpoints kept plus the one being written, less those
    already in the directory: a run resumed with --save_total_limit 1 next to its one
    checkpoint needs room for one more, not two (the GPU matrix's 1B full fine-tuning resume
    was refused with 24 GiB free for a 14 GiB checkpoint)."""
    from llm_finetune.output_dir import copies_on_disk_at_once

    def run(limit):
        return build_run_config(output_dir=str(tmp_path), save_steps=2, save_total_limit=limit)

    assert [copies_on_disk_at_once(run(k)) for k in (0, 1, 3)] == [2, 2, 4]
    (tmp_path / "checkpoints" / "step-00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-00000004.tmp").mkdir()  # not a checkpoint
    assert [copies_on_disk_at_once(run(k)) for k in (0, 1, 3)] == [2, 1, 3]


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


# --- the default path: loader workers, LoRA dropout, accumulation -----------------------------

def default_path_settings(model_dir, **extra) -> dict:
    """FAST, but with what FAST turns off for determinism left at the defaults: a loader worker
    that prefetches, LoRA with dropout; and two accumulation steps (4 optimizer steps: 8
    micro-batches, which max_train_step counts as llama-recipes does)."""
    kwargs = {k: v for k, v in FAST.items()
              if k not in ("num_workers_dataloader", "lora_config.lora_dropout")}
    run = build_run_config(**kwargs)
    assert run.train.num_workers_dataloader >= 1 and run.peft.lora_dropout > 0
    return {**kwargs, "model_name": str(model_dir), "use_peft": True, "run_validation": False,
            "batch_size_training": 2, "gradient_accumulation_steps": 2, "max_train_step": 8,
            "lr_scheduler": "step", **extra}


@pytest.mark.parametrize("batching", [{}, {"batching_strategy": "packing", "context_length": 128}],
                         ids=["padding", "packing"])
def test_resume_is_exact_on_the_default_path(batching, tiny_model_dir, tmp_path):
    """Stopped after step 3, resumed from the checkpoint of step 2: steps 3-4 repeat the
    uninterrupted run bit for bit (the loader's worker had fetched batches beyond step 2 when
    that checkpoint was taken; dropout draws the same masks)."""
    kwargs = default_path_settings(tiny_model_dir, **batching)
    straight = step_losses(finetuning.main(**kwargs, output_dir=str(tmp_path / "straight")))
    out = tmp_path / "stopped"
    first = finetuning.main(**{**kwargs, "max_train_step": 6}, save_steps=2, output_dir=str(out))
    assert step_losses(first) == straight[:3]
    resumed = finetuning.main(**kwargs, output_dir=str(out),
                              resume_from_checkpoint=str(out / "checkpoints" / "step-00000002"))
    assert step_losses(resumed) == straight[2:]


def test_resume_is_exact_across_an_epoch_end(tiny_model_dir, tmp_path):
    """Two epochs of 3 steps, evaluated after each: resumed from step 2 (the epoch ends, is
    evaluated, the next one starts) and from the epoch-end checkpoint of step 3, the losses and
    evaluations repeat the uninterrupted run."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "",
                                        "output": f"{2 * i + 1}"}) + "\n" for i in range(15)))
    kwargs = default_path_settings(tiny_model_dir, dataset="file_dataset", num_epochs=2,
                                   max_train_step=0, run_validation=True,
                                   **{"file_dataset.data_files": str(data),
                                      "file_dataset.val_split": 0.2})
    out = tmp_path / "run"
    straight = finetuning.main(**kwargs, save_steps=2, save_each_epoch=True, output_dir=str(out))
    assert straight["steps"] == 6  # 12 rows, 4 per step
    saved = sorted(d.name for d in (out / "checkpoints").iterdir())
    assert saved == ["step-00000002", "step-00000003", "step-00000004", "step-00000006"]
    for step in (2, 3):
        resumed = finetuning.main(**kwargs, output_dir=str(tmp_path / f"from-{step}"),
                                  resume_from_checkpoint=str(out / "checkpoints" / saved[step - 2]))
        assert step_losses(resumed) == step_losses(straight)[step:]
        assert resumed["eval_loss"] == straight["eval_loss"][step // 3:]


# --- robust checkpoints: real failures --------------------------------------------------------

FULL = dict(RUN, max_train_step=6)  # full fine-tuning, no loader worker: quick runs


def quick_run(model_dir, out, **extra) -> dict:
    return finetuning.main(**{**FULL, "model_name": str(model_dir), **extra}, output_dir=str(out))


def steps_in_metrics(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resuming_an_older_checkpoint_in_the_same_output_dir(tiny_model_dir, tmp_path):
    """Resumed from step 2 of a run that went on to step 4: the new run's checkpoints take the
    place of the abandoned ones (set aside, never picked by auto), and auto then continues the
    new timeline."""
    quick_run(tiny_model_dir, tmp_path, max_train_step=4, save_steps=1)
    quick_run(tiny_model_dir, tmp_path, max_train_step=4, save_steps=1,
              resume_from_checkpoint=str(tmp_path / "checkpoints" / "step-00000002"))
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [
        f"step-{n:08d}" for n in (1, 2, 3, 4)]
    aside = checkpoints / "abandoned-after-step-00000002"
    assert sorted(p.name for p in aside.iterdir()) == ["step-00000003", "step-00000004"]
    assert steps_in_metrics(tmp_path) == [1, 2, 3, 4]
    again = quick_run(tiny_model_dir, tmp_path, max_train_step=5, resume_from_checkpoint="auto")
    assert [m["step"] for m in again["metrics"]] == [5]


def test_torn_last_line_of_metrics_is_dropped_on_resume(tiny_model_dir, tmp_path, capsys):
    quick_run(tiny_model_dir, tmp_path, max_train_step=2, save_steps=2)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 1, "lo')  # killed while appending
    quick_run(tiny_model_dir, tmp_path, max_train_step=3, resume_from_checkpoint="auto")
    assert "dropped its half-written last line" in capsys.readouterr().out
    assert steps_in_metrics(tmp_path) == [1, 2, 3]


def truncate(path: Path, keep: int = 10) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_auto_falls_back_past_damaged_checkpoints(tiny_model_dir, tmp_path, capsys):
    """Newest checkpoint with a truncated MANIFEST, the one before with a truncated shard, the
    one before that with a deleted RNG file: auto names each and resumes from step 1 (metrics
    cut back to step 1, not earlier or later); an explicit damaged path is refused with what,
    where and the fix."""
    first = quick_run(tiny_model_dir, tmp_path, save_steps=1, max_train_step=4)
    checkpoints = tmp_path / "checkpoints"
    truncate(checkpoints / "step-00000004" / "MANIFEST.json")
    truncate(next((checkpoints / "step-00000003").glob("*.distcp")))
    (checkpoints / "step-00000002" / "rng-rank0.pt").unlink()
    for name, problem in [("step-00000004", "its MANIFEST.json is unreadable"),
                          ("step-00000003", r"__0_0\.distcp has 10 bytes, MANIFEST.json records"),
                          ("step-00000002", "rng-rank0.pt is missing")]:
        with pytest.raises(ConfigError, match=rf"{name}: {problem}.*intact ones there: "
                                              r"step-00000001.*--resume_from_checkpoint auto"):
            validate(build_run_config(resume_from_checkpoint=str(checkpoints / name)),
                     world_size=1, cuda=False)
    resumed = quick_run(tiny_model_dir, tmp_path, max_train_step=3, resume_from_checkpoint="auto")
    out = capsys.readouterr().out
    assert all(f"skipping checkpoint {checkpoints / name}" in out
               for name in ("step-00000004", "step-00000003", "step-00000002"))
    assert step_losses(resumed) == step_losses(first)[1:3]
    assert steps_in_metrics(tmp_path) == [1, 2, 3]


class PlantedPayload:
    """Unpickling this runs ``os.mkdir(marker)``: what a tampered state file could do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def plant_in_trainer_state(file: Path, payload) -> None:
    import torch

    torch.save({"step": 2, "payload": payload}, file)


def plant_in_index(file: Path, payload) -> None:
    file.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("name, plant", [("trainer_state.pt", plant_in_trainer_state),
                                         (".metadata", plant_in_index)],
                         ids=["trainer_state", "dcp_index"])
def test_planted_pickle_in_a_checkpoint_is_not_executed(name, plant, tiny_model_dir, tmp_path):
    """A payload planted in our state file or in DCP's index (MANIFEST updated to match, as
    whoever planted it could) is refused with the file named, and never runs."""
    quick_run(tiny_model_dir, tmp_path, max_train_step=2, save_steps=2)
    checkpoint = tmp_path / "checkpoints" / "step-00000002"
    marker = tmp_path / "payload-ran"
    plant(checkpoint / name, PlantedPayload(marker))
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    manifest["files"][name] = (checkpoint / name).stat().st_size
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"{re.escape(name)}: refused to load"):
        quick_run(tiny_model_dir, tmp_path, max_train_step=4, resume_from_checkpoint="auto")
    assert not marker.exists(), "the planted payload ran"


def test_checkpoint_of_another_model_shape_is_refused(tiny_model_dir, tmp_path):
    """LoRA rank 8 saved, rank 4 resumed: the tensors that differ are named, before loading."""
    lora = dict(use_peft=True, max_train_step=2, save_steps=2)
    quick_run(tiny_model_dir, tmp_path, **lora)
    expected = (r"(?s)holds another model than this run builds .*lora_A"
                r".*\[8, 128\] in the checkpoint, \[4, 128\] in this model")
    with pytest.raises(ValueError, match=expected):
        quick_run(tiny_model_dir, tmp_path / "other", **lora, **{"lora_config.r": 4},
                  resume_from_checkpoint=str(tmp_path / "checkpoints" / "step-00000002"))


def cli_run(model_dir, out, *flags, preexec_fn=None, **popen) -> subprocess.CompletedProcess:
    """The run as a separate process (quick settings), so that it can fail or die for real."""
    cmd = [sys.executable, "-m", "llm_finetune.finetuning", "--model_name", str(model_dir),
           *recipe_flags("batch_size_training"),
           "--output_dir", str(out), "--run_validation", "False", "--save_model", "False",
           "--num_workers_dataloader", "0", "--batch_size_training", "4",
           "--lora_config.lora_dropout", "0.0", "--plot_metrics", "False",
           "--warmup_steps", "3", *flags]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=preexec_fn, **popen)


def small_file_limit():
    """In the child: files may grow to 1 MiB, then writes fail with EFBIG (as on a full disk;
    SIGXFSZ ignored so the write returns the error)."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))


def test_storage_error_inside_dcp_save_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path):
    """A real write failure inside torch.distributed.checkpoint (which reaches the caller as
    DCP's CheckpointException): the half-written directory is removed, the step-2 checkpoint
    kept, and the error says what to do."""
    quick_run(tiny_model_dir, tmp_path, max_train_step=2, save_steps=2)
    done = cli_run(tiny_model_dir, tmp_path, "--max_train_step", "4", "--save_steps", "2",
                   "--resume_from_checkpoint", "auto", preexec_fn=small_file_limit)
    assert done.returncode != 0
    assert re.search(r"CheckpointSaveError: saving checkpoint step-00000004 failed \(.+\); the "
                     r"newest complete checkpoint, \S*step-00000002, is untouched. Free space",
                     done.stderr), done.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002"]


KILLED_WHILE_PRUNING = """
import os, signal, sys
from llm_finetune import finetuning
from tests.helpers import TINY_RECIPE

real_unlink = os.unlink


def unlink(path, *args, **kwargs):  # SIGKILL as the first shard of a checkpoint is deleted
    if str(path).endswith(".distcp"):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_unlink(path, *args, **kwargs)


os.unlink = unlink
finetuning.main(**dict(TINY_RECIPE, model_name=sys.argv[1], output_dir=sys.argv[2],
                       max_train_step=4, save_steps=1, save_total_limit=1, run_validation=False,
                       save_model=False, plot_metrics=False, num_workers_dataloader=0,
                       batch_size_training=4, warmup_steps=3))
"""


def test_sigkill_while_a_save_prunes_leaves_no_damaged_checkpoint(tiny_model_dir, tmp_path):
    """Killed (SIGKILL) while the save of step 2 deletes step 1 (save_total_limit 1): no
    directory named step-N is left half-deleted, and auto resumes the curve from step 2."""
    died = subprocess.run([sys.executable, "-c", KILLED_WHILE_PRUNING, str(tiny_model_dir),
                           str(tmp_path)], env=ENV, capture_output=True, text=True, timeout=300)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    named = [p for p in (tmp_path / "checkpoints").iterdir() if STEP_NAME.fullmatch(p.name)]
    assert [p.name for p in named] == ["step-00000002"]
    assert all(checkpoint_problem(p) is None for p in named)
    resumed = quick_run(tiny_model_dir, tmp_path, max_train_step=4, resume_from_checkpoint="auto")
    assert [m["step"] for m in resumed["metrics"]] == [3, 4]


@pytest.fixture
def restore_determinism(monkeypatch):
    """--deterministic changes process-wide settings: put them back after the test."""
    import torch

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("FLASH_ATTENTION_DETERMINISTIC", raising=False)
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    torch.backends.cuda.enable_cudnn_sdp(True)


def test_deterministic_reaches_torch_before_the_model_is_built(tiny_model_dir, tmp_path,
                                                              monkeypatch, restore_determinism):
    import torch

    seen = {}
    real_load_model = finetuning.load_model

    def load_model(*args, **kwargs):  # observe torch's settings as the model is built
        seen.update(deterministic=torch.are_deterministic_algorithms_enabled(),
                    cublas=os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                    mem_efficient_sdp=torch.backends.cuda.mem_efficient_sdp_enabled(),
                    cudnn=torch.backends.cudnn.deterministic)
        return real_load_model(*args, **kwargs)

    monkeypatch.setattr(finetuning, "load_model", load_model)
    summary = quick_run(tiny_model_dir, tmp_path, max_train_step=3, deterministic=True)
    assert seen == {"deterministic": True, "cublas": ":4096:8", "mem_efficient_sdp": False,
                    "cudnn": True}
    losses = step_losses(summary)
    assert len(losses) == 3 and losses[-1] < losses[0]  # it trains
