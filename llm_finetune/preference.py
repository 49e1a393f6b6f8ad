"""Direct preference optimisation: the objective of ``--method dpo``.

A batch holds preference pairs, chosen responses in its first half and rejected ones in its
second (``data/pairs.py``), so one forward of the policy scores both. Each response's score is
its log-probability summed over its labelled tokens (the prompt is -100), against the same
score under a *reference model* that does not train:

    loss = -logsigmoid(beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)))

(``sigmoid``, the DPO paper's loss), or the ``ipo`` and ``hinge`` variants (docs/preference.md).

The reference model is the starting point of training, and must stay it:

- with adapters (``--use_peft``): the same model with its LoRA turned off (peft's
  ``disable_adapter``), under ``no_grad``: no second copy of the weights, under FSDP too;
- with full fine-tuning (one process or DDP): a frozen copy of the model taken before the first
  step (and before a checkpoint is restored into the model).

Its forward runs in eval mode: no dropout, so a pair's reference score is a fixed number (not a
new draw each step), and no random numbers are drawn, so the policy's dropout masks, and an
exact resume, do not depend on the reference forward.
"""

import contextlib
import copy

import torch
import torch.nn.functional as F

from llm_finetune.errors import ConfigError
from llm_finetune.loss import IGNORE, output_layer, sequence_loss_sums
from llm_finetune.model import unwrap


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Every module in eval mode while active, then each back in the mode it had."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class AdaptersOff:
    """The reference model of adapter training: the policy itself with its adapters off.

    ``model``: the model the trainer trains (a PEFT model, possibly inside FSDP or DDP); the
    reference forward goes through it, so FSDP gathers the same shards as for the policy."""

    def __init__(self, model, head=None):
        self.peft_model = unwrap(model)
        self.head = head

    def log_probs(self, model, batch: dict) -> torch.Tensor:
        with torch.no_grad(), eval_mode(model), self.peft_model.disable_adapter():
            return -sequence_loss_sums(model, batch, self.head)


class FrozenCopy:
    """The reference model of full fine-tuning: a copy of the model's weights as they are now,
    in eval mode and without gradients. Costs one more model's memory (the planner counts it)."""

    def __init__(self, model, chunked: bool = True):
        model = unwrap(model)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        for original, copied in zip(model.modules(), self.model.modules()):
            if getattr(original, "_compiled_call_impl", None) is not None:
                copied.compile()  # a deep copy drops torch.compile's wrapper
        self.head = output_layer(self.model) if chunked else None

    def log_probs(self, model, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            return -sequence_loss_sums(self.model, batch, self.head)


def policy_head(model, chunked: bool):
    """The output layer that computes the policy's log-probabilities chunk by chunk, or None
    (the logits path). Per sequence, the chunked loss would keep an output-weight gradient for
    each one (a vocabulary x hidden fp32 tensor): a trained output layer takes the logits."""
    head = output_layer(model) if chunked else None
    return head if head is not None and not head.weight.requires_grad else None


def response_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Per sequence, the labelled tokens its log-probability sums over."""
    return (labels[:, 1:] != IGNORE).sum(dim=1)


def preference_losses(policy_chosen, policy_rejected, reference_chosen, reference_rejected,
                      beta: float, loss_type: str, chosen_tokens=None, rejected_tokens=None):
    """Per pair, the loss of ``loss_type`` from summed response log-probabilities.

    - ``sigmoid`` (DPO): -logsigmoid(beta * margin), margin = the chosen log-ratio minus the
      rejected one (log-ratio: policy minus reference);
    - ``hinge`` (SLiC): relu(1 - beta * margin);
    - ``ipo``: (margin - 1 / (2 * beta))^2 with log-ratios averaged over each response's
      tokens (``*_tokens``), as IPO's authors ran it: a summed margin would grow with the
      response's length, and the loss would pull it towards a fixed number."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    if loss_type == "ipo":
        margin = chosen_ratio / chosen_tokens - rejected_ratio / rejected_tokens
        return (margin - 1 / (2 * beta)) ** 2
    margin = chosen_ratio - rejected_ratio
    if loss_type == "hinge":
        return torch.relu(1 - beta * margin)
    return -F.logsigmoid(beta * margin)


class PreferenceLoss:
    """The objective of ``--method dpo`` (see ``loss.NextTokenLoss`` for what the trainer asks
    of an objective). Units are pairs: a step's loss is the mean over every pair of the step.
    Its metrics, means over pairs like the loss: ``rewards_chosen`` and ``rewards_rejected``
    (beta x log-ratio), ``reward_margin`` (their difference) and ``reward_accuracy`` (the share
    of pairs whose chosen response has the larger reward).

    ``reference``: ``AdaptersOff`` or ``FrozenCopy``; ``chunked``: log-probabilities computed
    inside the output layer, without the full logits (``loss.output_layer``), where the output
    layer does not train (adapters; the reference forward always)."""

    perplexity = False

    def __init__(self, model, reference, beta: float, loss_type: str = "sigmoid",
                 chunked: bool = True):
        self.head = policy_head(model, chunked)
        self.reference = reference
        self.beta = beta
        self.loss_type = loss_type

    def units(self, batch: dict) -> int:
        return len(batch["input_ids"]) // 2

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, int, dict]:
        pairs = self.units(batch)
        reference = self.reference.log_probs(model, batch).float()
        policy = -sequence_loss_sums(model, batch, self.head).float()
        tokens = response_tokens(batch["labels"])
        losses = preference_losses(policy[:pairs], policy[pairs:], reference[:pairs],
                                   reference[pairs:], self.beta, self.loss_type,
                                   tokens[:pairs], tokens[pairs:])
        rewards = self.beta * (policy.detach() - reference)
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        sums = {"rewards_chosen": chosen.sum(), "rewards_rejected": rejected.sum(),
                "reward_margin": (chosen - rejected).sum(),
                "reward_accuracy": (chosen > rejected).sum()}
        return losses.sum(), pairs, sums


def reference_model(run, model):
    """The reference the run's settings call for (``check_preference_settings`` refused the others). It
    computes its log-probabilities as the policy does (chunked or from logits): at the first
    step the two give the same numbers, bit for bit, and the loss is exactly log 2."""
    chunked = policy_head(model, run.train.chunked_loss) is not None
    if run.train.use_peft:
        return AdaptersOff(model, output_layer(model) if chunked else None)
    return FrozenCopy(model, chunked)


def check_preference_settings(run) -> None:
    """``--method dpo``: what its data, reference model and batching need."""
    t = run.train
    if t.method != "dpo":
        return
    if t.dpo_beta <= 0:
        raise ConfigError(f"--dpo_beta must be positive, got {t.dpo_beta}")
    if t.dataset != "file_dataset":
        raise ConfigError(f"--method dpo trains on preference pairs, which --dataset {t.dataset} "
                          "does not have: use --dataset file_dataset --file_dataset.data_files "
                          "prefs.jsonl, rows of prompt, chosen and rejected (docs/preference.md)")
    if t.batching_strategy == "packing":
        raise ConfigError("--method dpo compares each chosen response with its rejected one, "
                          "rows of one padded batch: use --batching_strategy padding")
    if t.use_peft and t.peft_method != "lora":
        raise ConfigError(f"--method dpo scores the reference model as the model with its LoRA "
                          f"turned off; --peft_method {t.peft_method} is not supported: use "
                          "--peft_method lora")
    if t.from_peft_checkpoint:
        raise ConfigError("--method dpo with --from_peft_checkpoint would score the reference as "
                          "the base model without that adapter, not as the model you start from. "
                          "Merge the adapter first (python -m llm_finetune.convert "
                          "merge_adapters) and pass the merged model as --model_name")
    if t.enable_fsdp and not t.use_peft:
        raise ConfigError("--method dpo with full fine-tuning under --enable_fsdp would need a "
                          "second, sharded frozen model as the reference, which is not supported: "
                          "add --use_peft (the reference is the model with its LoRA off), or "
                          "use --enable_ddp or one process")
