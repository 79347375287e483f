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
    # rotary convention: "half" = HF rotate_half (x1, x2 = halves; out = x*cos + cat(-x2, x1)*sin)
    rope: str = "half"
    # the block is h = x + self_attn(attn_norm(x)); out = h + mlp(mlp_norm(h)) with o_proj the
    # attention's last op and down_proj the MLP's: calibration passes may then reuse the attention
    # output between groups (rsq.calib.blockpass; checked against the layer's own forward at run time)
    prenorm_residual: bool = True
    notes: str = ""

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """Sequential quantization groups (spec §1). Members of a group read the same input."""
        return (
            (self.k_proj, self.v_proj, self.q_proj),
            (self.o_proj,),
            (self.up_proj, self.gate_proj),
            (self.down_proj,),
        )

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    # ------------------------------------------------------------------ accessors
    def get_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def head_dim(self, config) -> int:
        hd = getattr(config, "head_dim", None)
        return int(hd) if hd else config.hidden_size // config.num_attention_heads

    def num_heads(self, config) -> int:
        return int(config.num_attention_heads)

    def num_kv_heads(self, config) -> int:
        return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention. x: (B, H, T, d); cos/sin: (B or 1, T, d)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
