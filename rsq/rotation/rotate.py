"""Function-preserving rotation of a decoder-only model (QuaRot; spec §2).

All weight arithmetic runs in float64 and is cast back to the model dtype. Steps:

1. untie the lm_head from the embedding if they are tied (the two sides need different matrices
   once the final norm is folded into the lm_head);
2. optionally centre the embedding rows (the reference code's quirk; not function-preserving for
   RMSNorm models, hence off by default);
3. fold every RMSNorm scale into the linears that read it and set the norm weight to 1 — the HF
   norm module stays (it upcasts to float32, unlike the reference's RMSN);
4. residual rotation R1 = diag(random ±1)·H/√d (seeded): inputs of embed, q/k/v/gate/up and
   lm_head become W·Q, outputs of o_proj/down_proj become Qᵀ·W (and their biases);
5. an exact Hadamard on the down_proj input (W ← W·Hᵀ, online x ← H·x);
6. a per-head Hadamard on v_proj's output rows (and bias), with W_o ← W_o·(H_heads ⊗ H_hd)ᵀ and an
   online cross-head Hadamard before o_proj. Where no Hadamard of an order exists, the fallback
   (skip, or a seeded random orthogonal matrix) is applied explicitly and recorded.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from rsq.config import RotationConfig
from rsq.models.adapter import ModelAdapter
from rsq.rotation.hadamard import (
    hadamard_kind,
    hadamard_transform,
    has_hadamard,
    random_hadamard,
    random_orthogonal,
)
from rsq.rotation.online import OnlineRotation, attach_online_rotation

log = logging.getLogger(__name__)


def _set(linear_or_emb: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    p = linear_or_emb.weight
    p.data = weight.to(p.dtype)
    if bias is not None:
        linear_or_emb.bias.data = bias.to(linear_or_emb.bias.dtype)


def _w64(module: nn.Module) -> torch.Tensor:
    return module.weight.data.double()


def untie_lm_head(model: nn.Module, adapter: ModelAdapter) -> bool:
    embed = model.get_submodule(adapter.embed)
    head = model.get_submodule(adapter.lm_head)
    if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embed.weight.data.clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    # transformers re-ties on some calls (e.g. save_pretrained) when this mapping is present
    for attr in ("_tied_weights_keys", "_dynamic_tied_weights_keys"):
        if getattr(model, attr, None):
            setattr(model, attr, type(getattr(model, attr))())
    return True


def fuse_norms(model: nn.Module, adapter: ModelAdapter, center_embeddings: bool = False) -> None:
    """Fold RMSNorm scales into the following linears (float64); norms become weightless."""
    if center_embeddings:
        emb = model.get_submodule(adapter.embed)
        w = _w64(emb)
        _set(emb, w - w.mean(dim=1, keepdim=True))
    for layer in adapter.get_layers(model):
        for norm_name, readers in adapter.norm_fusions:
            norm = layer.get_submodule(norm_name)
            gamma = norm.weight.data.double()
            for name in readers:
                lin = layer.get_submodule(name)
                _set(lin, _w64(lin) * gamma[None, :])
            norm.weight.data.fill_(1.0)
    norm = model.get_submodule(adapter.final_norm)
    head = model.get_submodule(adapter.lm_head)
    _set(head, _w64(head) * norm.weight.data.double()[None, :])
    norm.weight.data.fill_(1.0)


def residual_rotation(n: int, cfg: RotationConfig) -> tuple[torch.Tensor, str]:
    """The float64 orthogonal Q (n, n) for the residual stream and a description of it."""
    if cfg.mode == "hadamard" and has_hadamard(n):
        return random_hadamard(n, cfg.seed), f"random-sign hadamard {hadamard_kind(n)}"
    if cfg.mode == "hadamard":
        log.warning("no Hadamard matrix of order %d: the residual rotation uses a random orthogonal matrix", n)
    return random_orthogonal(n, cfg.seed), "random orthogonal (QR of a Gaussian)"


def _like(Q: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Q on the module's device (modules of a large model may live on different devices)."""
    return Q.to(module.weight.device)


def rotate_residual(model: nn.Module, adapter: ModelAdapter, Q: torch.Tensor) -> None:
    emb = model.get_submodule(adapter.embed)
    _set(emb, _w64(emb) @ _like(Q, emb))
    head = model.get_submodule(adapter.lm_head)
    _set(head, _w64(head) @ _like(Q, head))
    for layer in adapter.get_layers(model):
        for name in adapter.residual_readers:
            lin = layer.get_submodule(name)
            _set(lin, _w64(lin) @ _like(Q, lin))
        for name in adapter.residual_writers:
            lin = layer.get_submodule(name)
            q = _like(Q, lin)
            bias = None if lin.bias is None else q.T @ lin.bias.data.double()
            _set(lin, q.T @ _w64(lin), bias)


def _rotate_in(W: torch.Tensor, n: int, kind: str, seed: int) -> torch.Tensor:
    """W·Mᵀ along the last dim for the site's orthogonal M (float64)."""
    if kind.startswith("random"):
        return W @ random_orthogonal(n, seed).to(W.device).T
    return hadamard_transform(W, n)


def rotate_down_proj(model: nn.Module, adapter: ModelAdapter, cfg: RotationConfig) -> dict:
    inter = adapter.get_layers(model)[0].get_submodule(adapter.down_proj).in_features
    kind = _site_kind(inter, "full", cfg)
    if kind is None:
        return {
            "module": adapter.down_proj,
            "kind": "skipped",
            "size": inter,
            "reason": f"no Hadamard of order {inter}",
        }
    spec = OnlineRotation(adapter.down_proj, kind, inter, seed=cfg.seed + 1)
    for layer in adapter.get_layers(model):
        lin = layer.get_submodule(adapter.down_proj)
        _set(lin, _rotate_in(_w64(lin), inter, kind, spec.seed))
        attach_online_rotation(lin, spec)
    return {**spec.to_dict(), "recipe": hadamard_kind(inter) if kind == "full" else "random orthogonal"}


def rotate_value_path(model: nn.Module, adapter: ModelAdapter, cfg: RotationConfig) -> list[dict]:
    config = model.config
    hd, heads = adapter.head_dim(config), adapter.num_heads(config)
    records = []
    if not has_hadamard(hd):
        return [{"module": adapter.v_proj, "kind": "skipped", "size": hd, "reason": f"no Hadamard of order {hd}"}]
    cross = _site_kind(heads, "cross_head", cfg)
    spec = None if cross is None else OnlineRotation(adapter.o_proj, cross, heads, head_dim=hd, seed=cfg.seed + 2)
    for layer in adapter.get_layers(model):
        v = layer.get_submodule(adapter.v_proj)
        # rows of W_v are (kv_heads, hd): apply H_hd to each head's block of rows
        W = _w64(v)
        Wv = hadamard_transform(W.reshape(-1, hd, W.shape[1]).transpose(1, 2), hd).transpose(1, 2).reshape(W.shape)
        bias = None if v.bias is None else hadamard_transform(v.bias.data.double().reshape(-1, hd), hd).reshape(-1)
        _set(v, Wv, bias)
        o = layer.get_submodule(adapter.o_proj)
        Wo = _w64(o)  # (hidden, heads * hd)
        Wo = hadamard_transform(Wo.reshape(Wo.shape[0], heads, hd), hd)
        if spec is not None:
            Wo = _rotate_in(Wo.transpose(1, 2), heads, cross, spec.seed).transpose(1, 2)
        _set(o, Wo.reshape(Wo.shape[0], heads * hd))
        if spec is not None:
            attach_online_rotation(o, spec)
    records.append({"module": adapter.v_proj, "kind": "per_head", "size": hd, "recipe": hadamard_kind(hd)})
    if spec is None:
        records.append(
            {
                "module": adapter.o_proj,
                "kind": "skipped",
                "size": heads,
                "reason": f"no Hadamard of order {heads} (heads); cross-head part left out",
            }
        )
    else:
        records.append(
            {**spec.to_dict(), "recipe": hadamard_kind(heads) if cross == "cross_head" else "random orthogonal"}
        )
    return records


def _site_kind(n: int, base: str, cfg: RotationConfig) -> str | None:
    if cfg.mode == "hadamard" and has_hadamard(n):
        return base
    if cfg.fallback == "random" or cfg.mode == "random":
        return f"random_{base}"
    return None


@torch.no_grad()
def rotate_model(model: nn.Module, adapter: ModelAdapter, cfg: RotationConfig) -> dict:
    """Rotate ``model`` in place; return a record of every site (stored in results/checkpoints)."""
    untied = untie_lm_head(model, adapter)
    if untied:
        log.warning("embedding and lm_head were tied: untied them (the rotated lm_head differs)")
    fuse_norms(model, adapter, cfg.center_embeddings)
    Q, description = residual_rotation(model.config.hidden_size, cfg)
    rotate_residual(model, adapter, Q)
    online = []
    if cfg.online_down:
        online.append(rotate_down_proj(model, adapter, cfg))
    if cfg.online_value:
        online.extend(rotate_value_path(model, adapter, cfg))
    return {
        "seed": cfg.seed,
        "mode": cfg.mode,
        "residual": {"size": model.config.hidden_size, "matrix": description},
        "untied_embeddings": untied,
        "center_embeddings": cfg.center_embeddings,
        "online": online,
    }
