"""Where a job's model weights live: the layer loop asks a weight source for layer i before its
turn and hands it back after; nothing else in the loop knows.

* :class:`InMemoryWeights`: the whole model was loaded (rsq.io.loading) and stays in memory.
* :class:`rsq.io.streaming.LayerStreamer`: a skeleton on ``meta`` whose ends are loaded first
  and whose layers are read from the safetensors files at their turn, and emptied after it.
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from rsq.config import TORCH_DTYPES, RSQConfig
from rsq.io.loading import load_model
from rsq.io.streaming import LayerStreamer, load_tokenizer_and_generation
from rsq.models.adapter import ModelAdapter
from rsq.models.device import resolve_device


class WeightSource(Protocol):
    streamed: bool  # layers come from files at their turn
    timing_key: str | None  # the stage their reading is billed to, if any

    def fetch(self, index: int, layer: nn.Module) -> None: ...

    def release(self, index: int, layer: nn.Module) -> None: ...

    def close(self) -> None: ...  # after the last layer, or a failure: nothing left in flight


class InMemoryWeights:
    """Every layer is in memory all along: fetch and release have nothing to do."""

    streamed = False
    timing_key = None

    def fetch(self, index: int, layer: nn.Module) -> None:
        pass

    def release(self, index: int, layer: nn.Module) -> None:
        pass

    def close(self) -> None:
        pass


def open_weights(
    cfg: RSQConfig, adapter: ModelAdapter, preloaded: tuple | None, streamed: tuple | None, prefetch: bool = True
):
    """(model, tokenizer, weight source): ``preloaded`` = (model, tokenizer) as given; ``streamed``
    = (skeleton, checked StreamSource) from rsq.io.streaming.open_streamed, its ends loaded now;
    else the whole model from ``cfg.model`` (rsq.io.loading). ``prefetch``: a streamed model's next
    layer is read on a background thread during the current layer's turn, into pinned memory for a
    CUDA device."""
    dtype = TORCH_DTYPES[cfg.dtype]
    if preloaded is not None:
        model, tokenizer = preloaded
        return model, tokenizer, InMemoryWeights()
    if streamed is not None:
        model, source = streamed
        pin = prefetch and resolve_device(cfg.device).type == "cuda"
        weights = LayerStreamer(source, model, adapter, dtype, prefetch=prefetch, pin=pin)
        weights.load_ends()  # the decoder layers stay on meta until their turn
        return model, load_tokenizer_and_generation(source.path, model), weights
    model, tokenizer = load_model(cfg.model or None, dtype, adapter)
    return model, tokenizer, InMemoryWeights()
