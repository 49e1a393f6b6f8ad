"""Next-token cross-entropy without the full logits tensor.

For a 128k vocabulary the logits are the largest tensor of a step: 4 x 2048 tokens of Llama-3-8B
give 2 GiB of bf16 logits, their 4 GiB fp32 copy, and the 4 GiB that cross-entropy keeps for
backward (their share of a measured peak: docs/fsdp.md). Here the output projection and the
loss are one operation (``linear_cross_entropy``): it runs over chunks of label tokens, computes
each chunk's loss and its gradients at once, and keeps only the gradients, which are the size of
the hidden states and of the output weight. Tokens whose label is ignored (prompts, padding)
never get logits at all.

The model computes the loss inside its own forward (``loss_in_output_layer``), where its output
projection's weight is available, unsharded by FSDP for that forward like any other weight; the
model's module tree and state dict are unchanged.

``NextTokenLoss`` is the objective the trainer calls: the loop knows only its two methods, so a
new objective (preference pairs: ``preference.PreferenceLoss``, another model family's labels)
is a new class beside it, not a branch in the loop.
"""

import contextlib

import torch
import torch.nn.functional as F

from llm_finetune.adapters import base_model_of
from llm_finetune.attention import packed_attention_inputs
from llm_finetune.data.batching import SAMPLE_STARTS
from llm_finetune.model import unwrap
from llm_finetune.vision import VISION_INPUTS

IGNORE = -100
# what a batch passes to the model: tokens, and a vision model's images and masks
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", *VISION_INPUTS)
CHUNK_TOKENS = 2048  # 2048 x 128k fp32 logits = 1 GiB per chunk, freed before the next


def model_inputs(model, batch: dict) -> dict:
    """What ``model`` is called with: the batch's model inputs, and for packed batches under
    the varlen attention where its samples start (attention.py)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    return inputs | packed_attention_inputs(unwrap(model), batch.get(SAMPLE_STARTS),
                                            batch["input_ids"].shape[1])


class LinearCrossEntropy(torch.autograd.Function):
    """Sum over ``targets`` != -100 of cross-entropy(hidden @ weight.T + bias, target).

    Forward computes the gradients chunk by chunk and saves them; backward scales them by the
    incoming gradient of the (scalar) loss. Matmuls run in ``compute_dtype`` with fp32 logits
    for the softmax, as ``F.cross_entropy(logits.float())`` on bf16 logits does."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, compute_dtype):
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        shape = hidden.shape
        hidden = hidden.reshape(-1, shape[-1])
        targets = targets.reshape(-1)
        rows = (targets != IGNORE).nonzero().squeeze(1)
        w = weight.to(compute_dtype)
        b = bias.to(compute_dtype) if bias is not None else None
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if need_bias else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for chunk in rows.split(CHUNK_TOKENS):
            x = hidden[chunk].to(compute_dtype)
            logits = F.linear(x, w, b).float()
            target = targets[chunk]
            log_z = torch.logsumexp(logits, dim=-1)
            loss += (log_z - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if not (need_hidden or need_weight or need_bias):
                continue
            # d loss / d logits = softmax - one_hot(target), formed in place over the logits;
            # the fp32 copy is dropped before the matmuls that use it
            logits.sub_(log_z[:, None]).exp_()
            logits[torch.arange(len(chunk), device=logits.device), target] -= 1
            grad = logits.to(compute_dtype)
            del logits
            if need_hidden:
                grad_hidden[chunk] = (grad @ w).to(hidden.dtype)
            if need_weight:
                grad_weight += grad.t() @ x  # per chunk in compute_dtype, summed in fp32
            if need_bias:
                grad_bias += grad.float().sum(0)
        ctx.save_for_backward(
            grad_hidden.reshape(shape) if need_hidden else None,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        scaled = (None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
        return *scaled, None, None


def linear_cross_entropy(hidden, weight, bias, targets) -> torch.Tensor:
    """The summed loss of ``LinearCrossEntropy`` in the autocast dtype when autocast is on
    (as ``F.linear`` would run), else in the hidden states' dtype."""
    device = hidden.device.type
    compute_dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
                     else hidden.dtype)
    if not torch.is_grad_enabled():  # a Function sees requires_grad even under no_grad: the
        # detached inputs say that no gradient is wanted (evaluation, a reference model)
        hidden, weight = hidden.detach(), weight.detach()
        bias = bias.detach() if bias is not None else None
    with torch.autocast(device, enabled=False):
        return LinearCrossEntropy.apply(hidden, weight, bias, targets, compute_dtype)


def output_layer(model):
    """The model's output projection if it is a plain ``nn.Linear`` applied last (no logit
    soft-capping or scaling after it), else None: such models use the plain loss."""
    model = unwrap(model)  # DDP does not forward attribute look-ups
    base = base_model_of(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    config = getattr(base, "config", None)
    post_processed = any(getattr(config, name, None) not in (None, 1.0, 1)
                         for name in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return head if type(head) is torch.nn.Linear and not post_processed else None


@contextlib.contextmanager
def loss_in_output_layer(head: torch.nn.Linear, labels: torch.Tensor,
                         per_sequence: bool = False):
    """While active, ``head`` returns the summed next-token loss of ``labels`` (shifted here:
    position t predicts label t+1) instead of logits, so the model's output ``logits`` is that
    scalar (``per_sequence``: one sum per sequence, a vector). Only this forward call is
    affected; the module itself is untouched."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)

    def forward(hidden):
        if hidden.shape[:2] != targets.shape:
            raise ValueError(f"hidden states {tuple(hidden.shape[:2])} and labels "
                             f"{tuple(targets.shape)} differ in length: use --chunked_loss False")
        if per_sequence:
            return torch.stack([linear_cross_entropy(h, head.weight, head.bias, t)
                                for h, t in zip(hidden, targets)])
        return linear_cross_entropy(hidden, head.weight, head.bias, targets)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def count_label_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def token_loss_sum(model, batch: dict, head=None) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over the batch's label tokens, and their number.

    ``head``: the model's output layer (``output_layer``), which then computes the loss itself,
    chunk by chunk, without the full logits; None: logits, then cross-entropy."""
    inputs = model_inputs(model, batch)
    labels = batch["labels"][:, 1:]
    tokens = count_label_tokens(batch)
    if head is not None:
        with loss_in_output_layer(head, batch["labels"]):
            return model(**inputs, use_cache=False).logits, tokens
    logits = model(**inputs, use_cache=False).logits
    logits = logits[:, : labels.shape[1]]  # prefix tuning may add no positions; be explicit
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, tokens


def sequence_loss_sums(model, batch: dict, head=None) -> torch.Tensor:
    """Per sequence of the batch, the sum of next-token cross-entropy over its label tokens:
    minus the log-probability of its labelled part (what preference objectives compare).
    ``head`` as in ``token_loss_sum``."""
    inputs = model_inputs(model, batch)
    if head is not None:
        with loss_in_output_layer(head, batch["labels"], per_sequence=True):
            return model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    logits = model(**inputs, use_cache=False).logits[:, : labels.shape[1]]
    losses = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE,
                             reduction="none")
    return losses.sum(dim=1)


class NextTokenLoss:
    """Supervised fine-tuning's objective. What the trainer asks of an objective:

    - ``units(batch)``: how many terms the batch's loss sums over (here label tokens); a step's
      loss is the sum over all its micro-batches and ranks divided by their total units;
    - ``objective(model, batch)``: (summed loss tensor, units, metric sums) of one micro-batch.
      The metric sums (name -> tensor, summed over the same units) are the objective's own
      per-step means, beside the loss: the trainer sums them over micro-batches and ranks and
      divides by the units too. Next-token loss has none;
    - ``perplexity``: whether exp(mean loss) is a perplexity (the loss is a mean token
      cross-entropy), reported by evaluation.

    ``chunked``: the loss computed inside the output layer, without the full logits, where the
    model's output layer allows it (``output_layer``)."""

    perplexity = True

    def __init__(self, model, chunked: bool = True):
        self.head = output_layer(model) if chunked else None

    def units(self, batch: dict) -> int:
        return count_label_tokens(batch)

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, int, dict]:
        return *token_loss_sum(model, batch, self.head), {}
