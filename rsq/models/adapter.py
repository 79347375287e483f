"""Architecture knowledge as data: where each piece of a decoder-only family lives.

Rotation, capture and the pipeline read a :class:`ModelAdapter` and never branch on model type.
Module paths are relative to the model (``layers``, ``embed``, ...) or to one decoder layer
(``q_proj``, ``attn_norm``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ModelAdapter:
    name: str
    model_types: tuple[str, ...]
    # model-level paths
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # layer-level paths
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    q_proj: str = "self_attn.q_proj"
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    o_proj: str = "self_attn.o_proj"
    gate_proj: str = "mlp.gate_proj"
    up_proj: str = "mlp.up_proj"
    down_proj: str = "mlp.down_proj"
    # --- family facts (None: derived from the paths above, the Llama layout) ---
    # sequential quantization groups (spec §1); members of a group read the same input
    groups: tuple[tuple[str, ...], ...] | None = None
    # norm -> the linears that read it: rotation folds the norm's scale into them
    norm_fusions: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    # residual-stream rotation sites: linears that read the stream (W <- W Q) and write it (W <- Qᵀ W)
    residual_readers: tuple[str, ...] | None = None
    residual_writers: tuple[str, ...] | None = None
    # biases of q/k/v, o_proj and the MLP as the HF modeling code builds them: True (always), False
    # (never) or the name of the config flag that switches them
    qkv_bias: bool | str = "attention_bias"
    o_bias: bool | str = "attention_bias"
    mlp_bias: bool | str = "mlp_bias"
    # the block is h = x + self_attn(attn_norm(x)); out = h + mlp(mlp_norm(h)) with o_proj the
    # attention's last op and down_proj the MLP's: calibration passes may then reuse the attention
    # output between groups (rsq.calib.blockpass; checked against the layer's own forward at run time)
    prenorm_residual: bool = True
    notes: str = ""

    def __post_init__(self) -> None:
        derived = {
            "groups": (
                (self.k_proj, self.v_proj, self.q_proj),
                (self.o_proj,),
                (self.up_proj, self.gate_proj),
                (self.down_proj,),
            ),
            "norm_fusions": (
                (self.attn_norm, (self.q_proj, self.k_proj, self.v_proj)),
                (self.mlp_norm, (self.gate_proj, self.up_proj)),
            ),
            "residual_readers": (self.q_proj, self.k_proj, self.v_proj, self.gate_proj, self.up_proj),
            "residual_writers": (self.o_proj, self.down_proj),
        }
        for name, value in derived.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)

    def biases(self, config) -> tuple[bool, bool, bool]:
        """(q/k/v bias, o_proj bias, MLP bias) of a model of this family with ``config``."""

        def rule(r: bool | str) -> bool:
            return bool(getattr(config, r, False)) if isinstance(r, str) else r

        return rule(self.qkv_bias), rule(self.o_bias), rule(self.mlp_bias)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    # ------------------------------------------------------------------ accessors
    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def head_dim(self, config) -> int:
        return config_head_dim(config)

    def num_heads(self, config) -> int:
        return int(config.num_attention_heads)

    def num_kv_heads(self, config) -> int:
        return config_kv_heads(config)

    def linear_shapes(self, config) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear of one decoder layer of a model with ``config``, by the
        adapter's field name (q_proj, ..., down_proj): the shape table plans and checks read."""
        d, inter = config.hidden_size, config.intermediate_size
        hd, heads, kv = self.head_dim(config), self.num_heads(config), self.num_kv_heads(config)
        return {
            "q_proj": (heads * hd, d),
            "k_proj": (kv * hd, d),
            "v_proj": (kv * hd, d),
            "o_proj": (d, heads * hd),
            "gate_proj": (inter, d),
            "up_proj": (inter, d),
            "down_proj": (d, inter),
        }


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention. x: (B, H, T, d); cos/sin: (B or 1, T, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def config_head_dim(config) -> int:
    """Per-head width of a transformers config (its head_dim, else hidden_size / heads): what
    :meth:`ModelAdapter.head_dim` returns, for code that holds a model of any family."""
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def config_kv_heads(config) -> int:
    """K/V heads of a transformers config (num_key_value_heads, else the attention heads)."""
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
