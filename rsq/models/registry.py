"""HF ``model_type`` -> ModelAdapter. The only place that maps names to families."""

from __future__ import annotations

from rsq.errors import UnsupportedModelError
from rsq.models.adapter import ModelAdapter
from rsq.models.llama import LLAMA
from rsq.models.mistral import MISTRAL
from rsq.models.qwen2 import QWEN2

ADAPTERS: dict[str, ModelAdapter] = {}


def register(adapter: ModelAdapter) -> ModelAdapter:
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter
    return adapter


for _adapter in (LLAMA, MISTRAL, QWEN2):
    register(_adapter)


def supported_types() -> list[str]:
    return sorted(ADAPTERS)


def resolve(model_or_config) -> ModelAdapter:
    """The adapter for a model (or its config); UnsupportedModelError lists what is supported."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported: {', '.join(supported_types())}. "
            "To add a family, declare a ModelAdapter for it in rsq/models/ and register it in "
            "rsq/models/registry.py"
        )
    return ADAPTERS[model_type]
