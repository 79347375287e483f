"""Llama 2 / 3 / 3.1 (rope scaling) / 3.2 (tied embeddings), and SmolLM2, which is a Llama."""

from rsq.models.adapter import ModelAdapter

LLAMA = ModelAdapter(
    name="llama",
    model_types=("llama",),
    notes="RMSNorm, SwiGLU MLP, GQA; tied embeddings in Llama-3.2 and SmolLM2 (untied on rotation)",
)
