"""Mistral v0.3 and Mistral-Nemo (head_dim 128 while hidden/heads = 160: read from config.head_dim)."""

import dataclasses

from rsq.models.llama import LLAMA

MISTRAL = dataclasses.replace(
    LLAMA,
    name="mistral",
    model_types=("mistral",),
    qkv_bias=False,  # no biases anywhere
    o_bias=False,
    mlp_bias=False,
    notes="Llama layout; sliding-window attention (if configured) is ignored during calibration",
)
