"""``--fsdp_config.optimizer anyprecision``: AdamW for bf16 weights whose small updates add up."""

import torch

from llm_finetune import finetuning, optim
from llm_finetune.optim import AnyPrecisionAdamW
from tests.helpers import FAST


def fit(kind: str, steps: int = 500, lr: float = 1e-4) -> torch.Tensor:
    """Weights of a least-squares fit after ``steps`` noisy steps: fp32 AdamW ("fp32"), AdamW on
    bf16 weights ("bf16"), or AnyPrecisionAdamW on bf16 weights ("anyprecision")."""
    torch.manual_seed(0)
    inputs, truth, start = torch.randn(64, 16), torch.randn(16, 4), torch.randn(16, 4)
    targets = inputs @ truth
    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    weights = torch.nn.Parameter(start.to(dtype))
    optimizer = (AnyPrecisionAdamW if kind == "anyprecision" else torch.optim.AdamW)(
        [weights], lr=lr, weight_decay=0.01)
    rows = torch.Generator().manual_seed(1)
    for _ in range(steps):
        batch = torch.randint(0, 64, (16,), generator=rows)
        loss = ((inputs[batch].to(dtype) @ weights).float() - targets[batch]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return weights.detach().float()


def test_anyprecision_tracks_fp32_adamw_where_bf16_adamw_stalls():
    """Updates of 1e-4 on weights near 1 are below bf16's rounding step: plain AdamW on bf16
    weights barely moves them, Kahan-compensated updates follow fp32 AdamW."""
    reference, start = fit("fp32"), fit("fp32", steps=0)
    moved = (reference - start).norm()
    bf16_error = (fit("bf16") - reference).norm()
    anyprecision_error = (fit("anyprecision") - reference).norm()
    assert bf16_error > 0.9 * moved  # plain bf16 AdamW barely left the start
    assert anyprecision_error < 0.1 * moved
    assert anyprecision_error < 0.1 * bf16_error


def test_anyprecision_trains_and_checkpoints_a_bf16_model(tmp_path):
    summary = finetuning.main(**{**FAST, "max_train_step": 4, "save_steps": 2},
                              output_dir=str(tmp_path), pure_bf16=True,
                              **{"fsdp_config.optimizer": "anyprecision"})
    model = summary["model"]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    losses = [m["loss"] for m in summary["metrics"] if "loss" in m]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert (tmp_path / "checkpoints" / "step-00000004").is_dir()


def test_anyprecision_steps_in_slices_give_the_same_weights(monkeypatch):
    """A weight larger than a slice is updated slice by slice (bounded fp32 temporaries): the
    weights, moments and compensation equal one whole-tensor update bit for bit."""
    from llm_finetune import optim

    def run(slice_size):
        monkeypatch.setattr(optim, "STEP_SLICE", slice_size)
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(37, 11).bfloat16())
        opt = AnyPrecisionAdamW([weight], lr=1e-3, weight_decay=0.01)
        for _ in range(3):
            weight.grad = torch.randn(37, 11).bfloat16()
            opt.step()
        return weight.detach(), [opt.state[weight][k] for k in
                                 ("exp_avg", "exp_avg_sq", "compensation")]

    whole, whole_states = run(10**9)
    sliced, sliced_states = run(50)  # 407 elements in 9 slices, the last one short
    assert torch.equal(whole, sliced)
    assert all(torch.equal(a, b) for a, b in zip(whole_states, sliced_states))
