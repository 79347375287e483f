"""Decode attention without repeating the KV cache for grouped-query attention (GQA).

transformers' ``sdpa`` attention gives SDPA the grouped K/V only without a mask (CUDA's kernels
fall back to the math path for ``enable_gqa`` with a mask); a static cache always needs a mask, so
every decode step copies K and V of every layer ``num_key_value_groups`` times (``repeat_kv``: two
copies per layer of the whole cache, 4x its bytes for Llama-3-8B; the largest non-GEMM kernels of
the step in bench/figures/generate_profile_h100_b16.txt). Recent transformers avoid it for one
query token in eager mode only, not under torch.compile, which is how rsq's loop decodes.

With one query token, the ``n_rep`` query heads that share a K/V head are ``n_rep`` query rows of
that head: query (b, heads, 1, d) viewed as (b, kv_heads, n_rep, d) attends over the unrepeated
(b, kv_heads, L, d) cache, the (b, 1, 1, L) mask broadcast to every row, and the output
(b, kv_heads, n_rep, d) is the (b, heads, 1, d) one. Every other call (prefill, no GQA, per-head
masks, dropout, extra arguments) is transformers' own ``sdpa`` function, unchanged.

:func:`use` registers this function (and transformers' sdpa mask) under :data:`NAME` with
transformers' attention interfaces (additive: nothing of transformers is replaced) and switches a
model to it for a ``with`` block; rsq's decode loop does it for each call on CUDA
(``LoopOptions(packed_gqa=...)``). With transformers' ``generate`` (checked on the CPU: the same
greedy tokens, eager and compiled)::

    with rsq.generation.attention.use(model):
        out = model.generate(ids, max_new_tokens=128, **rsq.decode_kwargs(model.device))
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

NAME = "rsq_sdpa"
_REGISTERED = False
_SDPA = None  # transformers' sdpa_attention_forward, set by register()


def decode_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
):
    """transformers' attention-function signature: (output (b, q_len, heads, d_v), None)."""
    n_rep = getattr(module, "num_key_value_groups", 1)
    b, heads, q_len, d = query.shape
    mask_ok = attention_mask is None or (attention_mask.dim() == 4 and attention_mask.shape[1] == 1)
    extras = any(kwargs.get(k) is not None for k in ("position_bias", "softcap", "sinks", "s_aux"))
    if n_rep > 1 and q_len == 1 and dropout == 0.0 and mask_ok and not extras and heads == key.shape[1] * n_rep:
        q = query.reshape(b, heads // n_rep, n_rep, d)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=attention_mask, scale=scaling)
        return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None
    return _SDPA(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def register() -> bool:
    """Register :data:`NAME` with transformers' attention and mask interfaces (idempotent); False
    where this transformers has no such interfaces."""
    global _REGISTERED, _SDPA
    if _REGISTERED:
        return True
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    _SDPA = sdpa_attention_forward
    ALL_ATTENTION_FUNCTIONS.register(NAME, decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    _REGISTERED = True
    return True


def applies(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs transformers' ``sdpa`` attention with grouped K/V heads (or runs this
    function already), on a transformers with the attention interfaces."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    return impl in ("sdpa", NAME) and bool(heads and kv and heads != kv) and register()


@contextlib.contextmanager
def use(model: torch.nn.Module, on: bool = True):
    """Run ``model`` with :func:`decode_attention` inside the block (where :func:`applies`; else, or
    with ``on=False``, unchanged); its attention implementation is restored on exit."""
    if not (on and applies(model)):
        yield False
        return
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield True
    finally:
        config._attn_implementation = before
