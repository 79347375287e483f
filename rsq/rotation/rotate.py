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

``RotationConfig.online`` chooses the run-time sites: ``exact`` (5 and 6 as above), ``export`` (5
as the block-diagonal Hadamard I ⊗ H_b/√b; no cross-head part) or ``none`` (no run-time rotation at
all: only what folds into the weights, so the model keeps its architecture). The ``export`` block b
is ``RotationConfig.export_block`` (``--export-block``): 0 = the largest power of two dividing the
width, whose Sylvester H_b compressed-tensors' ``hadamard`` transform reproduces (vLLM's Hadacore
kernel); else any Hadamard order dividing the width (H_b = H_K ⊗ sylvester, e.g. 1792 = 28 x 64 of
Qwen2.5-1.5B's 8960), which the export stores as a dense matrix (rsq/checkpoint/export.py).

Steps 1-2, the final norm and the embedding / lm_head sides of 4 touch the model's ends
(:func:`rotate_ends`); 3-6 act on one decoder layer at a time (:func:`rotate_layer`), so the
pipeline rotates each layer on the device just before it is calibrated. :func:`plan_rotation`
builds the matrices (float64) once; :func:`rotate_model` does all of it at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from rsq.config import RotationConfig
from rsq.errors import ConfigError
from rsq.models.adapter import ModelAdapter
from rsq.rotation.hadamard import (
    block_hadamard_transform,
    hadamard_kind,
    hadamard_transform,
    has_hadamard,
    random_hadamard,
    random_orthogonal,
    sylvester_block,
)
from rsq.rotation.online import OnlineRotation, attach_online_rotation
from rsq.rotation.pad import MlpPadding, pad_config, pad_layer, plan_padding

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


def residual_rotation(n: int, cfg: RotationConfig) -> tuple[torch.Tensor, str]:
    """The float64 orthogonal Q (n, n) for the residual stream and a description of it."""
    if cfg.mode == "hadamard" and has_hadamard(n):
        return random_hadamard(n, cfg.seed), f"random-sign hadamard {hadamard_kind(n)}"
    if cfg.mode == "hadamard":
        log.warning("no Hadamard matrix of order %d: the residual rotation uses a random orthogonal matrix", n)
    return random_orthogonal(n, cfg.seed), "random orthogonal (QR of a Gaussian)"


@dataclass
class RotationPlan:
    """Everything the rotation of one model needs, built once (float64 matrices on the host):
    the residual Q, the online sites to attach and the record stored with the checkpoint."""

    cfg: RotationConfig
    Q: torch.Tensor
    description: str
    hidden: int
    down: OnlineRotation | None = None
    value: bool = False  # per-head Hadamard of the value path
    cross: OnlineRotation | None = None
    head_dim: int = 1
    heads: int = 1
    online_records: list[dict] = field(default_factory=list)
    untied: bool = False
    padding: MlpPadding | None = None  # --pad-mlp: each layer's MLP zero-padded before its rotation
    _Q_on: dict = field(default_factory=dict)

    def Q_on(self, device: torch.device) -> torch.Tensor:
        """Q on ``device`` (float64), copied once per device."""
        key = str(device)
        if key not in self._Q_on:
            self._Q_on[key] = self.Q.to(device)
        return self._Q_on[key]

    @property
    def record(self) -> dict:
        return {
            "seed": self.cfg.seed,
            "mode": self.cfg.mode,
            "online_setting": self.cfg.online,
            "residual": {"size": self.hidden, "matrix": self.description},
            "untied_embeddings": self.untied,
            "center_embeddings": self.cfg.center_embeddings,
            "online": self.online_records,
            **({"mlp_padding": self.padding.record} if self.padding is not None else {}),
        }


def plan_rotation(model: nn.Module, adapter: ModelAdapter, cfg: RotationConfig) -> RotationPlan:
    """The matrices and sites of ``model``'s rotation; changes no weight. With ``cfg.pad_mlp``
    (rsq/rotation/pad.py) the down_proj site is planned at the padded MLP width, which
    :func:`rotate_ends` writes into the config and :func:`rotate_layer` gives each layer first."""
    config = model.config
    Q, description = residual_rotation(config.hidden_size, cfg)
    plan = RotationPlan(cfg, Q, description, config.hidden_size)
    inter = adapter.get_layers(model)[0].get_submodule(adapter.down_proj).in_features
    plan.padding = plan_padding(model, adapter, inter, cfg)
    if plan.padding is not None:  # the down_proj site is as wide as the padded MLP
        inter = plan.padding.padded
    if cfg.online_down:
        plan.online_records.append(_plan_down(plan, adapter, inter, cfg))
    if cfg.online_value:
        plan.online_records.extend(_plan_value(plan, adapter, config, cfg))
    return plan


def _plan_down(plan: RotationPlan, adapter: ModelAdapter, inter: int, cfg: RotationConfig) -> dict:
    site = {"module": adapter.down_proj, "size": inter}
    if cfg.online == "none":
        return {**site, "kind": "skipped", "reason": "--online-rotations none"}
    if cfg.online == "export":
        block = export_block(inter, cfg.export_block)
        plan.down = OnlineRotation(adapter.down_proj, "block", inter, head_dim=block)
        return {**plan.down.to_dict(), "recipe": f"block-diagonal {hadamard_kind(block)} x {inter // block}"}
    kind = _site_kind(inter, "full", cfg)
    if kind is None:
        return {**site, "kind": "skipped", "reason": f"no Hadamard of order {inter}"}
    plan.down = OnlineRotation(adapter.down_proj, kind, inter, seed=cfg.seed + 1)
    return {**plan.down.to_dict(), "recipe": hadamard_kind(inter) if kind == "full" else "random orthogonal"}


def export_block(width: int, block: int) -> int:
    """The down_proj Hadamard block of ``--online-rotations export`` for an MLP ``width``: ``block``
    (``--export-block``), or the largest power of two dividing the width when it is 0; ConfigError
    naming the orders that would work when ``block`` does not divide the width or has no Hadamard."""
    if block == 0:
        return sylvester_block(width)
    if width % block or not has_hadamard(block):
        fits = [b for b in range(4, width + 1, 4) if width % b == 0 and has_hadamard(b)]
        raise ConfigError(
            f"--export-block {block}: the down_proj input is {width} wide and the block must be a Hadamard "
            f"order that divides it; use 0 (auto: {sylvester_block(width)}) or one of {', '.join(map(str, fits))}"
        )
    return block


def _plan_value(plan: RotationPlan, adapter: ModelAdapter, config, cfg: RotationConfig) -> list[dict]:
    hd, heads = adapter.head_dim(config), adapter.num_heads(config)
    plan.head_dim, plan.heads = hd, heads
    if not has_hadamard(hd):
        return [{"module": adapter.v_proj, "kind": "skipped", "size": hd, "reason": f"no Hadamard of order {hd}"}]
    plan.value = True
    records = [{"module": adapter.v_proj, "kind": "per_head", "size": hd, "recipe": hadamard_kind(hd)}]
    skipped = {"module": adapter.o_proj, "kind": "skipped", "size": heads}
    if cfg.online != "exact":
        return records + [{**skipped, "reason": f"--online-rotations {cfg.online}: no cross-head part"}]
    cross = _site_kind(heads, "cross_head", cfg)
    if cross is None:
        return records + [{**skipped, "reason": f"no Hadamard of order {heads} (heads); cross-head part left out"}]
    plan.cross = OnlineRotation(adapter.o_proj, cross, heads, head_dim=hd, seed=cfg.seed + 2)
    recipe = hadamard_kind(heads) if cross == "cross_head" else "random orthogonal"
    return records + [{**plan.cross.to_dict(), "recipe": recipe}]


def _site_kind(n: int, base: str, cfg: RotationConfig) -> str | None:
    if cfg.mode == "hadamard" and has_hadamard(n):
        return base
    if cfg.fallback == "random" or cfg.mode == "random":
        return f"random_{base}"
    return None


def _rotate_in(W: torch.Tensor, spec: OnlineRotation) -> torch.Tensor:
    """W·Mᵀ along the last dim for the site's orthogonal M (float64)."""
    if spec.kind.startswith("random"):
        return W @ random_orthogonal(spec.size, spec.seed).to(W.device).T
    if spec.kind == "block":
        return block_hadamard_transform(W, spec.head_dim)
    return hadamard_transform(W, spec.size)


@torch.no_grad()
def rotate_ends(model: nn.Module, adapter: ModelAdapter, plan: RotationPlan, device=None) -> None:
    """Untie the lm_head, centre the embeddings if asked, fold the final norm into the lm_head and
    rotate the embedding and lm_head by Q — on ``device`` (default: where they live), in float64."""
    plan.untied = untie_lm_head(model, adapter)
    if plan.untied:
        log.warning("embedding and lm_head were tied: untied them (the rotated lm_head differs)")
    emb = model.get_submodule(adapter.embed)
    head = model.get_submodule(adapter.lm_head)
    norm = model.get_submodule(adapter.final_norm)
    if plan.padding is not None:  # the layers are padded at their turn; the config says so from now on
        pad_config(model.config, plan.padding)
        p = plan.padding
        log.info(
            "MLP zero-padded from %d to %d features (+%.1f %% MLP weights; function-preserving) for a larger "
            "down_proj Hadamard block (--pad-mlp %s; --pad-mlp 0 turns it off)",
            p.original,
            p.padded,
            100 * p.extra / p.original,
            plan.cfg.pad_mlp,
        )
    for module in (emb, head):
        home = module.weight.device
        where = torch.device(device) if device is not None else home
        dtype = module.weight.dtype
        W = module.weight.data.to(where).double()
        # each step rounds to the model dtype, as the whole-model rotation always has
        if module is emb and plan.cfg.center_embeddings:
            W = (W - W.mean(dim=1, keepdim=True)).to(dtype).double()
        if module is head:
            W = (W * norm.weight.data.to(where).double()[None, :]).to(dtype).double()
        # rounded to the model dtype where it was computed, then moved: a blocking device-to-host copy
        # would otherwise carry float64 (4x the bytes) and round on the host
        module.weight.data = (W @ plan.Q_on(where)).to(dtype).to(home)
        del W
    norm.weight.data.fill_(1.0)


@torch.no_grad()
def rotate_layer(layer: nn.Module, adapter: ModelAdapter, plan: RotationPlan) -> None:
    """Rotate one decoder layer in place, where it lives (float64 arithmetic, cast back): fold its
    norms, apply Q on the residual sides, and the down_proj / value-path rotations with their
    online modules attached. With ``plan.padding`` the MLP is zero-padded first (rsq/rotation/pad.py)."""
    if plan.padding is not None:
        pad_layer(layer, adapter, plan.padding)
    for norm_name, readers in adapter.norm_fusions:
        norm = layer.get_submodule(norm_name)
        gamma = norm.weight.data.double()
        for name in readers:
            lin = layer.get_submodule(name)
            _set(lin, _w64(lin) * gamma[None, :])
        norm.weight.data.fill_(1.0)
    Q = plan.Q_on(next(layer.parameters()).device)
    for name in adapter.residual_readers:
        lin = layer.get_submodule(name)
        _set(lin, _w64(lin) @ Q)
    for name in adapter.residual_writers:
        lin = layer.get_submodule(name)
        bias = None if lin.bias is None else Q.T @ lin.bias.data.double()
        _set(lin, Q.T @ _w64(lin), bias)
    if plan.down is not None:
        lin = layer.get_submodule(plan.down.module)
        _set(lin, _rotate_in(_w64(lin), plan.down))
        attach_online_rotation(lin, plan.down)
    if plan.value:
        _rotate_value(layer, adapter, plan)


def _rotate_value(layer: nn.Module, adapter: ModelAdapter, plan: RotationPlan) -> None:
    hd, heads, cross = plan.head_dim, plan.heads, plan.cross
    v = layer.get_submodule(adapter.v_proj)
    # rows of W_v are (kv_heads, hd): apply H_hd to each head's block of rows
    W = _w64(v)
    Wv = hadamard_transform(W.reshape(-1, hd, W.shape[1]).transpose(1, 2), hd).transpose(1, 2).reshape(W.shape)
    bias = None if v.bias is None else hadamard_transform(v.bias.data.double().reshape(-1, hd), hd).reshape(-1)
    _set(v, Wv, bias)
    o = layer.get_submodule(adapter.o_proj)
    Wo = _w64(o)  # (hidden, heads * hd)
    Wo = hadamard_transform(Wo.reshape(Wo.shape[0], heads, hd), hd)
    if cross is not None:
        Wo = _rotate_in(Wo.transpose(1, 2), cross).transpose(1, 2)
    _set(o, Wo.reshape(Wo.shape[0], heads * hd))
    if cross is not None:
        attach_online_rotation(o, cross)


@torch.no_grad()
def rotate_model(model: nn.Module, adapter: ModelAdapter, cfg: RotationConfig) -> dict:
    """Rotate ``model`` in place, all at once where it lives; return a record of every site (stored
    in results and checkpoints)."""
    plan = plan_rotation(model, adapter, cfg)
    apply_rotation(model, adapter, plan)
    return plan.record


@torch.no_grad()
def apply_rotation(model: nn.Module, adapter: ModelAdapter, plan: RotationPlan) -> None:
    """Apply ``plan`` to the whole of ``model`` now, where it lives."""
    rotate_ends(model, adapter, plan)
    for layer in adapter.get_layers(model):
        rotate_layer(layer, adapter, plan)
