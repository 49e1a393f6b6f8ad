"""The benchmark harness's loss check (benchmarks/compare.py --check), on CPU with the tiny
model: the GPU scenarios' levers are checked the same way on the device (docs/performance.md)."""

import json

import pytest

from benchmarks import compare


@pytest.fixture
def tiny_scenario(monkeypatch):
    """One sequence per forward x 4 accumulation steps, no recompute, compiled layers and the
    chunked loss: the levers of the 8B LoRA scenario, on the tiny model."""
    scenario = compare.Scenario("tiny-llama", "lora", 4, True, ["--use_peft", *compare.COMPILE],
                                micro_batch=1, our_ac=False)
    monkeypatch.setitem(compare.SCENARIOS, "tiny", scenario)
    return scenario


def check(tmp_path, tolerance: float) -> dict:
    (row,) = compare.main(only="tiny", check=True, steps=3, workdir=str(tmp_path),
                          out=str(tmp_path / "check.json"), tolerance=tolerance)
    return row


def test_the_levers_give_the_plain_path_s_losses(tiny_scenario, tmp_path):
    plain = compare.without_levers(tiny_scenario)
    assert plain.flags == ["--use_peft", "--chunked_loss", "False"] and plain.micro_batch == 0
    row = check(tmp_path, tolerance=1e-5)  # fp32 on CPU
    assert len(row["levers"]) == 3 and row["within_tolerance"]


def test_the_check_catches_a_lever_that_changes_the_math(tiny_scenario, tmp_path, monkeypatch):
    """A "lever" that doubles the LoRA scaling: the same first loss (B starts at zero),
    different later ones."""
    plain = compare.without_levers(tiny_scenario)
    changed = compare.Scenario(**{**vars(plain),
                                  "flags": [*plain.flags, "--lora_config.lora_alpha", "64"]})
    monkeypatch.setattr(compare, "without_levers", lambda scenario: changed)
    row = check(tmp_path, tolerance=1e-5)
    assert row["levers"][0] == pytest.approx(row["plain"][0], rel=1e-6)
    assert not row["within_tolerance"]


def test_the_fp32_check_computes_in_fp32_and_4bit_levers_keep_the_losses(monkeypatch, tmp_path):
    """``--fp32``: the GPU check without bf16 rounding (docs/performance.md). pure_bf16 goes,
    4-bit layers compute in fp32; the QLoRA scenario's levers then equal its plain path."""
    full = compare.in_fp32(compare.SCENARIOS["full_1b_ac_keep6_compile"].flags)
    assert "--fsdp_config.pure_bf16" not in full and full[-2:] == ["--mixed_precision", "False"]
    qlora = compare.in_fp32(compare.SCENARIOS["qlora_8b_mb1_noac_compile"].flags)
    assert qlora[-2:] == ["--quantization_config.compute_dtype", "float32"]
    monkeypatch.setitem(compare.SCENARIOS, "tiny", compare.Scenario(
        "tiny-llama", "qlora", 4, True, [*compare.QLORA, *compare.COMPILE], micro_batch=1,
        our_ac=False))
    (row,) = compare.main(only="tiny", check=True, steps=2, workdir=str(tmp_path), fp32=True,
                          out=str(tmp_path / "check.json"), tolerance=1e-5)
    assert len(row["levers"]) == 2 and row["within_tolerance"]
    for side in ("levers", "plain"):  # both runs were launched computing in fp32
        config = json.loads((tmp_path / f"tiny-{side}" / "run_config.json").read_text())
        assert config["train_config"]["mixed_precision"] is False
        assert config["quantization_config"]["compute_dtype"] == "float32"
