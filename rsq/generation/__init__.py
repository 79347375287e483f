"""Decoding: rsq's own generation loop (:func:`generate`, the default of ``rsq generate`` on a GPU)
and the settings for transformers' ``generate`` (:func:`decode_kwargs`).

* :mod:`rsq.generation.loop` — static cache sized per call, prefill, a compiled one-token step (CUDA
  graphs on a GPU), no host synchronisation per token.
* :mod:`rsq.generation.settings` — ``generate`` keyword arguments for a static cache + compiled step.
"""

from rsq.generation.loop import LoopOptions, Sampling, cache_length, decoder, generate
from rsq.generation.settings import compile_by_default, decode_kwargs

__all__ = ["generate", "Sampling", "LoopOptions", "cache_length", "decoder", "decode_kwargs", "compile_by_default"]
