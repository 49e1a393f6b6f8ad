"""FSDP under ``torchrun --nproc_per_node 2`` (gloo, CPU) against single-process training.

One torchrun launch runs every case (tests/dist_worker.py); each test compares one case with a
single-process run on the same global batch. Tolerance: fp32 on CPU, the only difference is the
order of floating-point sums across ranks, so per-step losses agree to 1e-5 relative.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from llm_finetune import finetuning
from tests.dist_worker import CASES, case_settings
from tests.helpers import REPO, TINY_RECIPE, probe_input, torchrun

RTOL = 1e-5


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory, tiny_model_dir, tied_model_dir, tied_config_dir):
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(REPO / "tests" / "dist_worker.py", str(out), str(tiny_model_dir), str(tied_model_dir),
             str(tied_config_dir))
    results = json.loads((out / "results.json").read_text())
    results["out"] = out
    return results


def single_process(case: str, model_dir, tmp_path, tied_config_dir) -> dict:
    """The same run in one process, with a per-rank batch twice as large (the global batch)."""
    kwargs = case_settings(case, str(model_dir), str(tied_config_dir))
    for key in ("enable_fsdp", "enable_ddp", "low_cpu_fsdp", "fsdp_config.sharding_strategy",
                "fsdp_config.sharding_group_size", "fsdp_config.replica_group_size",
                "fsdp_config.checkpoint_type", "fsdp_config.hsdp"):
        kwargs.pop(key, None)
    if kwargs.get("quantization") == "4bit":  # FSDP QLoRA computes and stores in bf16: so does this one
        kwargs["fsdp_config.pure_bf16"] = True
        kwargs.pop("save_steps", None)
    kwargs["batch_size_training"] *= 2
    kwargs["val_batch_size"] *= 2
    kwargs["save_model"] = False
    return finetuning.main(**kwargs, output_dir=str(tmp_path))


@pytest.mark.parametrize("case", ["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD",
                                  "HYBRID_SHARD_replicas",
                                  "lora", "llama_adapter", "prefix", "grad_accum_clip",
                                  "packing",
                                  "low_cpu_fsdp", "seeded_init", "seeded_init_lora",
                                  "seeded_init_tied", "qlora", "qlora_low_cpu", "qlora_seeded",
                                  "ddp_full_accum", "ddp_8bit", "fsdp_float8"])
def test_fsdp_matches_single_process(case, fsdp_results, tiny_model_dir, tied_config_dir,
                                     tmp_path):
    """Also for random-init models, whose ranks each initialised their own units: they hold
    the single-process model's weights, so they train the same."""
    if case == "fsdp_float8" and case not in fsdp_results:
        pytest.skip("needs torchao")
    reference = single_process(case, tiny_model_dir, tmp_path, tied_config_dir)
    expected = [m["loss"] for m in reference["metrics"] if "loss" in m]
    got = fsdp_results[case]["losses"]
    steps = CASES[case]["max_train_step"] // CASES[case].get("gradient_accumulation_steps", 1)
    assert len(got) == len(expected) == steps
    # QLoRA runs in bf16 on both sides; sums over ranks round differently (measured 1.5e-4);
    # float8's scales come from each rank's tokens, one process's from all of them
    tolerance = 1e-3 if case.startswith("qlora") else 3e-3 if case == "fsdp_float8" else RTOL
    assert got == pytest.approx(expected, rel=tolerance)
    assert fsdp_results[case]["eval_loss"] == pytest.approx(reference["eval_loss"], rel=tolerance)
    assert got[-1] < got[0], "training did not lower the loss"


@pytest.mark.parametrize("case", ["dpo_lora", "dpo_ddp_full"])
def test_dpo_on_two_ranks_matches_single_process(case, fsdp_results, tiny_model_dir,
                                                 tied_config_dir, tmp_path):
    """Preference pairs split over ranks: the loss and the reward metrics of every step, and
    of the evaluation, are those of one process on the whole global batch. A DPO loss is a
    difference of summed log-probabilities (tens of nats each), so the rounding that differs
    between the two shows more: 1e-5 absolute on the loss, 1e-4 on the rewards."""
    reference = single_process(case, tiny_model_dir, tmp_path, tied_config_dir)["metrics"]
    got = fsdp_results[case]["records"]
    assert len(got) == len(reference) == CASES[case]["max_train_step"] + 1  # + the evaluation
    for ours, theirs in zip(got, reference):
        loss = "loss" if "loss" in theirs else "eval_loss"
        assert ours[loss] == pytest.approx(theirs[loss], abs=1e-5)
        rewards = [k for k in theirs if "reward" in k]
        assert len(rewards) == 4
        assert [ours[k] for k in rewards] == pytest.approx([theirs[k] for k in rewards], abs=1e-4)
    assert got[0]["loss"] == pytest.approx(0.6931472, rel=1e-6)  # the reference is the start
    assert got[-1]["eval_reward_margin"] > 0


@pytest.mark.parametrize("case, expected", [("ddp_full_accum", "zeros"), ("ddp_8bit", "zeros"),
                                            ("FULL_SHARD", "none"), ("grad_accum_clip", "none")])
def test_ddp_keeps_its_gradients_in_its_buckets_between_steps(case, expected, fsdp_results):
    """DDP's gradients are views of its buckets, zeroed in place after each step (set to None,
    the next backward would make a second copy beside the buckets); FSDP frees them."""
    assert fsdp_results[case]["grads"] == expected


@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
def test_lora_resumes_exactly_on_the_default_path(engine, fsdp_results):
    """2 ranks, LoRA with dropout, a loader worker, 2 accumulation steps: resumed from the
    checkpoint of step 2, steps 3-4 repeat the uninterrupted run."""
    straight = fsdp_results[f"resume_{engine}_lora"]["losses"]
    resumed = fsdp_results[f"resume_{engine}_lora_resumed"]["losses"]
    assert len(straight) == 4
    assert resumed == straight[2:]


@pytest.mark.parametrize("tied", [False, True])
def test_low_cpu_fsdp_gives_rank0_weights_on_every_rank(tied, fsdp_results, tiny_model_dir,
                                                        tied_model_dir):
    from safetensors.torch import load_file

    directory = tied_model_dir if tied else tiny_model_dir
    on_disk = load_file(directory / "model.safetensors")
    ranks = fsdp_results["low_cpu_weights_tied" if tied else "low_cpu_weights"]
    assert [r["meta_before_wrap"] for r in ranks] == [False, True], \
        "rank 1 must not load weights: its model starts on the meta device"
    for rank in ranks:
        if tied:  # saved once, present under both names in the model
            assert rank["checksums"]["lm_head.weight"] == rank["checksums"]["model.embed_tokens.weight"]
        for name, tensor in on_disk.items():
            assert rank["checksums"][name] == pytest.approx(float(tensor.double().sum()), abs=1e-9)


def test_full_state_dict_loads_with_plain_transformers(fsdp_results):
    model = AutoModelForCausalLM.from_pretrained(fsdp_results["out"] / "full_state_dict" / "model")
    with torch.no_grad():
        logits = model(input_ids=probe_input()).logits
    torch.testing.assert_close(logits, torch.tensor(fsdp_results["full_state_dict"]["logits"]),
                               rtol=1e-4, atol=1e-4)


def test_sharded_state_dict_is_a_dcp_checkpoint(fsdp_results, tiny_model_dir, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    # lands in dist_checkpoint_root_folder/dist_checkpoint_folder-<model name>
    directory = fsdp_results["out"] / "sharded_state_dict-dcp" / f"fine-tuned-{tiny_model_dir.name}"
    assert (directory / ".metadata").is_file()
    dcp_to_torch_save(directory, tmp_path / "full.pt")
    saved = torch.load(tmp_path / "full.pt", weights_only=True)
    assert saved["optimizer"]["state"], "save_optimizer=True must store the AdamW states"
    state = saved["model"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.load_state_dict(state)
    with torch.no_grad():
        logits = model(input_ids=probe_input()).logits
    torch.testing.assert_close(logits, torch.tensor(fsdp_results["sharded_state_dict"]["logits"]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "llama_adapter", "prefix", "dpo_lora"])
def test_fsdp_adapter_loads_with_plain_peft(method, fsdp_results, tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, fsdp_results["out"] / method).eval()
    with torch.no_grad():
        logits = model(input_ids=probe_input()).logits
    torch.testing.assert_close(logits, torch.tensor(fsdp_results[method]["logits"]),
                               rtol=1e-4, atol=1e-4)


def test_sharded_checkpoint_converts_to_a_hugging_face_model(fsdp_results, tiny_model_dir,
                                                             tmp_path):
    from llm_finetune.convert import dcp_to_hf

    directory = fsdp_results["out"] / "sharded_state_dict-dcp" / f"fine-tuned-{tiny_model_dir.name}"
    # the model's name comes from the train_params.yaml beside the shards, as llama-recipes'
    # converter reads it (settings as strings, train_config and fsdp_config in one mapping)
    params = yaml.safe_load((directory / "train_params.yaml").read_text())
    assert params["model_name"] == str(tiny_model_dir)
    assert params["checkpoint_type"] == "SHARDED_STATE_DICT" and params["lr"] == "0.001"
    dcp_to_hf(str(directory), output=str(tmp_path / "hf"), dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        logits = model(input_ids=probe_input()).logits
    torch.testing.assert_close(logits, torch.tensor(fsdp_results["sharded_state_dict"]["logits"]),
                               rtol=1e-4, atol=1e-4)


def test_conversion_round_trip_writes_shards_one_at_a_time(tied_model_dir, tmp_path):
    """HF -> DCP -> HF with 1 MB shards: several safetensors files and an index, the tied
    lm_head stored once, and the same logits as the original model."""
    from llm_finetune.convert import dcp_to_hf, hf_to_dcp

    hf_to_dcp(str(tied_model_dir), str(tmp_path / "dcp"), dtype="float32")
    dcp_to_hf(str(tmp_path / "dcp"), str(tied_model_dir), str(tmp_path / "hf"), dtype="float32",
              max_shard_gb=2**-10)
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert "lm_head.weight" not in index["weight_map"]
    original = AutoModelForCausalLM.from_pretrained(tied_model_dir)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids=probe_input()).logits,
                                   original(input_ids=probe_input()).logits)


def test_merged_adapter_needs_no_peft(fsdp_results, tiny_model_dir, tmp_path):
    from llm_finetune.convert import merge_adapters

    merge_adapters(str(tiny_model_dir), str(fsdp_results["out"] / "lora"),
                   str(tmp_path / "merged"), dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        logits = model(input_ids=probe_input()).logits
    torch.testing.assert_close(logits, torch.tensor(fsdp_results["lora"]["logits"]),
                               rtol=1e-4, atol=1e-4)


def test_two_nodes_hybrid_shard_equals_single_process(tiny_model_dir, tmp_path):
    """Two torchrun launches on this machine act as two nodes of 2 ranks (c10d rendezvous, the
    multi-node command line): HYBRID_SHARD shards inside each node and replicates across them,
    and the losses equal one process training the same global batch."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = dict(TINY_RECIPE, model_name=str(tiny_model_dir), max_train_step=4,
                    run_validation=False, save_model=False, num_workers_dataloader=0)
    settings.pop("batch_size_training")  # 2 per rank below, 8 in the one-process reference
    flags = [f"--{k}={v}" for k, v in settings.items()]
    node = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
            "2", "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
            "--rdzv_id", "two-nodes", "-m", "llm_finetune.finetuning", "--enable_fsdp", *flags,
            "--fsdp_config.sharding_strategy=HYBRID_SHARD",
            "--fsdp_config.sharding_group_size=2", "--batch_size_training=2",
            f"--output_dir={tmp_path / 'hsdp'}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    nodes = [subprocess.Popen(node, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    logs = [n.communicate(timeout=300)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(log[-3000:] for log in logs)
    got = [json.loads(line)["loss"] for line in
           (tmp_path / "hsdp" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    reference = finetuning.main(**settings, batch_size_training=8,
                                output_dir=str(tmp_path / "one"))
    expected = [m["loss"] for m in reference["metrics"] if "loss" in m]
    assert len(got) == 4
    assert got == pytest.approx(expected, rel=RTOL)


def test_qlora_low_cpu_fsdp_trains_as_quantising_at_load(fsdp_results):
    """Under low_cpu_fsdp, 4-bit layers are quantised unit by unit on each rank from rank 0's
    full-precision weights; that gives the same 4-bit model, so the same losses, as every rank
    quantising the whole model while loading (the plain QLoRA run)."""
    assert fsdp_results["qlora_low_cpu"]["losses"] == \
        pytest.approx(fsdp_results["qlora"]["losses"], rel=1e-6)
    ranks = fsdp_results["low_cpu_4bit_load"]
    assert ranks[0]["meta_before_wrap"] is False and ranks[1]["meta_before_wrap"] is True
    assert ranks[0]["linear4bit"] == ranks[1]["linear4bit"] > 0
    assert ranks[0]["whole_4bit_model_on_a_device"] is False


def test_ddp_8bit_adapter_loads_with_plain_peft_on_an_8bit_base(fsdp_results, tiny_model_dir):
    """8-bit LoRA trained data parallel (DDP, 2 ranks) matches one process (the parity test
    above) and its adapter, loaded by plain peft onto the base quantised to 8-bit by plain
    transformers, gives the trained model's logits."""
    from transformers import BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, fsdp_results["out"] / "ddp_8bit").eval()
    with torch.no_grad():
        logits = model(input_ids=probe_input()).logits.float()
    torch.testing.assert_close(logits, torch.tensor(fsdp_results["ddp_8bit"]["logits"]),
                               rtol=1e-3, atol=1e-3)


def test_fsdp_qlora_adapter_loads_with_plain_peft_on_a_4bit_base(fsdp_results, tiny_model_dir):
    """The adapter of a QLoRA run under FSDP (4-bit weights stored as bf16 and sharded) loads
    onto the same base quantised by plain transformers, and gives the trained model's logits
    (bf16 tolerance); the run also wrote its step checkpoints."""
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant,
                                                dtype=torch.bfloat16, device_map={"": "cpu"})
    model = PeftModel.from_pretrained(base, fsdp_results["out"] / "qlora").eval()
    with torch.no_grad():
        logits = model(input_ids=probe_input()).logits.float()
    torch.testing.assert_close(logits, torch.tensor(fsdp_results["qlora"]["logits"]),
                               rtol=3e-2, atol=3e-2)
    assert sorted(d.name for d in (fsdp_results["out"] / "qlora" / "checkpoints").iterdir()) == \
        ["step-00000002", "step-00000004"]


def test_conversion_takes_the_runs_tokenizer_when_the_model_directory_has_none(
        fsdp_results, tiny_model_dir, tmp_path, capsys):
    """A config-only model directory (a random-init shape) has no tokenizer: the converter
    writes the one named by --tokenizer_name, or the weights alone with a note."""
    import shutil

    from llm_finetune.convert import dcp_to_hf

    directory = fsdp_results["out"] / "sharded_state_dict-dcp" / f"fine-tuned-{tiny_model_dir.name}"
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_model_dir / "config.json", config_only / "config.json")
    dcp_to_hf(str(directory), str(config_only), str(tmp_path / "named"), dtype="float32",
              tokenizer_name="tiny-llama")
    assert (tmp_path / "named" / "tokenizer_config.json").is_file()
    dcp_to_hf(str(directory), str(config_only), str(tmp_path / "none"), dtype="float32")
    assert not (tmp_path / "none" / "tokenizer_config.json").is_file()
    assert "no tokenizer in" in capsys.readouterr().out
    AutoModelForCausalLM.from_pretrained(tmp_path / "none")  # the weights are all there
