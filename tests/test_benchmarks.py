"""The benchmark harness's loss check (benchmarks/compare.py --check), on CPU with the tiny
model: the GPU scenarios' levers are checked the same way on the device (docs/performance.md)."""

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
