"""Attention for packed batches through PyTorch's own flash-attention varlen kernel
(``torch.nn.attention.varlen``), registered with transformers as ``PACKED_ATTENTION``.

A packed block holds several samples that must not see each other. SDPA can only be told so
with a dense block-diagonal mask, which rules out its flash kernel; flex attention takes the
mask as a sparse block mask, but compiles its kernel at the first batch (a first step of tens
of seconds: docs/performance.md). The varlen kernel is flash-attention itself, ready at once, given
where each sample starts: the collator computes those offsets
(``data.batching.sample_starts``, on the loader's CPU side: no GPU sync) and the loss passes
them to the model (``packed_attention_inputs``), as transformers' flash-attention-2 kwargs
``cu_seq_lens_q/k`` and ``max_length_q/k``. No ``flash_attn`` package is needed.
docs/performance.md has the measurements.

Calls without the offsets (generation, padded batches, evaluation of a padded set) go to SDPA
with the causal and padding masks built here, so a model loaded with this attention still
generates.
"""

import importlib.util
import inspect

import torch
import torch.nn.functional as F

PACKED_ATTENTION = "llm_finetune_varlen"


def varlen_available() -> bool:
    """PyTorch's varlen kernel on a CUDA GPU (PyTorch 2.10 and later)."""
    return (torch.cuda.is_available()
            and importlib.util.find_spec("torch.nn.attention.varlen") is not None)


def supports(config) -> bool:
    """Whether the kernel computes this model's attention as transformers would: causal
    softmax attention over the whole sample, without a sliding window, logit soft-capping
    (Gemma 2), attention sinks (gpt-oss) or attention dropout. Other models keep flex
    attention, which transformers gives all of these."""
    text = config.get_text_config()
    return not (getattr(text, "sliding_window", None)
                or getattr(text, "attn_logit_softcapping", None)
                or getattr(text, "attention_dropout", 0.0)
                or getattr(text, "model_type", "") in SINK_MODELS)


SINK_MODELS = ("gpt_oss",)


def register() -> None:
    """Make ``PACKED_ATTENTION`` an ``attn_implementation`` transformers knows, with
    flash-attention's mask rule (no mask unless a row has padding)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    global _VARLEN
    if _VARLEN is not None:
        return
    _VARLEN = _varlen_call()  # here, not in the compiled layers' trace
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionMaskInterface.register(PACKED_ATTENTION,
                                    ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])


def packed_attention_inputs(model, starts: torch.Tensor | None, length: int) -> dict:
    """The model's keyword arguments for a packed batch of rows of ``length`` tokens whose
    samples start at ``starts`` (over the flattened batch, and its end), when ``model`` (the
    Hugging Face or PEFT model, outside any FSDP or DDP wrapper) computes attention with
    ``PACKED_ATTENTION``; nothing otherwise."""
    config = getattr(model, "config", None)
    if starts is None or getattr(config, "_attn_implementation", None) != PACKED_ATTENTION:
        return {}
    # the longest sample is at most a row: an upper bound needs no GPU sync and keeps one
    # compiled shape
    return {"cu_seq_lens_q": starts, "cu_seq_lens_k": starts, "max_length_q": length,
            "max_length_k": length}


def _varlen_call():
    """``varlen_attn`` with causal masking and grouped KV heads, in the spelling of the
    installed PyTorch (2.10 takes ``is_causal``; later ones a window and ``enable_gqa``)."""
    from torch.nn.attention.varlen import varlen_attn

    parameters = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    gqa = "enable_gqa" in parameters

    def call(query, key, value, offsets_q, offsets_k, max_q, max_k, scale):
        if not gqa and key.shape[1] != query.shape[1]:
            groups = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        extra = {"enable_gqa": True} if gqa else {}
        return varlen_attn(query, key, value, offsets_q, offsets_k, max_q, max_k, scale=scale,
                           **causal, **extra)

    return call


_VARLEN = None  # set by register()


def packed_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers' attention interface: ``query`` (batch, heads, length, head_dim), ``key``
    and ``value`` with the KV heads; returns (batch, length, heads, head_dim) and no weights."""
    offsets = kwargs.get("cu_seq_lens_q")
    batch, heads, length, head_dim = query.shape
    unsupported = [name for name in ("sliding_window", "softcap", "s_aux")
                   if kwargs.get(name) is not None] + (["dropout"] if dropout else [])
    if unsupported:  # supports() keeps such models on flex attention; never compute them wrong
        raise NotImplementedError(f"{PACKED_ATTENTION} does not compute {unsupported}")
    if offsets is None:
        if module.training:  # a packed training batch without its sample starts would let
            # samples attend to each other: a wrapper hid the model's config from the loss
            raise RuntimeError(f"{PACKED_ATTENTION}: a training forward without the batch's "
                               "sample starts (loss.model_inputs passes them)")
        return sdpa_fallback(query, key, value, attention_mask, scaling), None
    dtype = compute_dtype(query, value)
    if dtype not in (torch.float16, torch.bfloat16):  # flash-attention has no fp32 kernel
        mask = same_sample_mask(offsets.to(query.device), batch, length)
        return sdpa_fallback(query, key, value, None, scaling, mask), None
    flat = [t.transpose(1, 2).reshape(-1, t.shape[1], head_dim).to(dtype)
            for t in (query, key, value)]
    out = _VARLEN(*flat, offsets.to(query.device), kwargs["cu_seq_lens_k"].to(query.device),
                  kwargs["max_length_q"], kwargs["max_length_k"], scaling)
    return out.reshape(batch, length, heads, head_dim), None


def compute_dtype(query, value) -> torch.dtype:
    """The dtype SDPA would compute in: autocast's when it is on (under fp32 weights the
    rotary embedding leaves q and k in fp32, v in bf16), else the tensors'."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return value.dtype


def same_sample_mask(offsets: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """The block-diagonal causal mask of a packed batch, (batch, 1, length, length): each token
    sees the earlier tokens of its own sample (what SDPA needs where the kernel cannot run)."""
    starts = torch.zeros(batch * length, dtype=torch.int32, device=offsets.device)
    starts[offsets[1:-1].long()] = 1
    sample = starts.cumsum(0).reshape(batch, length)
    return (sample[:, None, :, None] == sample[:, None, None, :]) & causal_mask(
        length, length, offsets.device)


def sdpa_fallback(query, key, value, attention_mask, scaling, mask=None):
    """SDPA for calls the varlen kernel cannot take: causal, with a 2-D padding mask (the one
    flash-attention's mask rule leaves) turned into SDPA's boolean mask, the queries being the
    last ``length`` of the keys (generation with a cache); or with a given boolean ``mask``."""
    length, keys = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    if mask is not None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    elif attention_mask is None and length in (1, keys):
        out = F.scaled_dot_product_attention(query, key, value, is_causal=length > 1,
                                             scale=scaling)
    else:
        mask = causal_mask(length, keys, query.device)
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, -keys:].bool()
            # a padding query that sees no key would give NaN, which later layers would carry
            # into real tokens through its key and value: let it see every key instead
            mask = mask | ~mask.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def causal_mask(length: int, keys: int, device) -> torch.Tensor:
    """Query i (the last ``length`` of ``keys`` positions) sees keys up to its own position."""
    query_positions = torch.arange(keys - length, keys, device=device)[:, None]
    return torch.arange(keys, device=device)[None, :] <= query_positions
