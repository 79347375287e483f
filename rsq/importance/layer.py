"""Plumbing between a decoder layer and the pure importance strategies: compute only what the
chosen strategy needs (post-RoPE q/k, full-precision outputs, token ids, counts) and return the
per-token weights (B, T) of one batch of sequences."""

from __future__ import annotations

import torch

from rsq.calib.capture import layer_forward, rope_from_kwargs
from rsq.config import RSQConfig
from rsq.importance.strategies import ImportanceContext, compute_weights, strategy_needs
from rsq.models.adapter import ModelAdapter, apply_rope


def make_weight_fn(cfg: RSQConfig, adapter: ModelAdapter, config, windows: torch.Tensor):
    """A ``weight_fn(layer_index, layer, x, kwargs, ids) -> (B, T)`` for the pipeline."""
    name = cfg.importance.strategy
    needs = strategy_needs(name)
    counts = None
    if "token_counts" in needs:
        # counts over the whole (expanded) calibration set; rolls do not change counts
        counts = torch.bincount(windows.reshape(-1), minlength=int(config.vocab_size)).float() * cfg.importance.expand

    @torch.no_grad()
    def weight_fn(index: int, layer, x: torch.Tensor, kwargs: dict, ids: torch.Tensor) -> torch.Tensor:
        ctx = ImportanceContext(cfg=cfg.importance, kernels=cfg.kernels)
        if "x" in needs:
            ctx.x = x
        if "y" in needs:
            ctx.y = layer_forward(layer, x, kwargs)
        if needs & {"q", "k"}:
            ctx.q, ctx.k = attention_qk(layer, adapter, config, x, kwargs)
        if "token_ids" in needs:
            ctx.token_ids = ids.to(x.device)
        if counts is not None:
            ctx.token_counts = counts.to(x.device)
        return compute_weights(name, ctx)

    return weight_fn


def attention_qk(layer: torch.nn.Module, adapter: ModelAdapter, config, x: torch.Tensor, kwargs: dict):
    """Post-RoPE queries and keys of one layer from its input x (B, T, D), computed from the
    projections alone (independent of transformers' attention internals). Returns
    q (B, Hq, T, d), k (B, Hkv, T, d)."""
    h = layer.get_submodule(adapter.attn_norm)(x)
    q = layer.get_submodule(adapter.q_proj)(h)
    k = layer.get_submodule(adapter.k_proj)(h)
    b, t, _ = x.shape
    hd = adapter.head_dim(config)
    q = q.view(b, t, -1, hd).transpose(1, 2)
    k = k.view(b, t, -1, hd).transpose(1, 2)
    cos, sin = rope_from_kwargs(kwargs)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
