"""Qwen2 / Qwen2.5: Llama layout with biases on q/k/v and tied embeddings up to 3B."""

import dataclasses

from rsq.models.llama import LLAMA

QWEN2 = dataclasses.replace(
    LLAMA,
    name="qwen2",
    model_types=("qwen2",),
    qkv_bias=True,  # Qwen2Attention: q/k/v always biased, o_proj never
    o_bias=False,
    mlp_bias=False,
    notes="q/k/v biases (kept through fusion and rotation); tied embeddings at <= 3B",
)
