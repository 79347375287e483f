"""Decoding: rsq's own generation loop (:func:`generate`, the default of ``rsq generate`` on a GPU)
and the settings for transformers' ``generate`` (:func:`decode_kwargs`).

* :mod:`rsq.generation.loop` — static cache sized per call, prefill, a compiled one-token step (CUDA
  graphs on a GPU), no host synchronisation per token.
* :mod:`rsq.generation.settings` — ``generate`` keyword arguments for a static cache + compiled step.
* :mod:`rsq.generation.fusion` — q/k/v and gate/up of a quantized model as one GEMM each
  (:func:`fuse_siblings`, undone by :func:`unfuse`; the loop fuses on CUDA by default).
"""

from rsq.generation.fusion import fuse_siblings, unfuse
from rsq.generation.loop import LoopOptions, Sampling, cache_length, decoder, generate
from rsq.generation.settings import compile_by_default, decode_kwargs

__all__ = [
    "generate",
    "Sampling",
    "LoopOptions",
    "cache_length",
    "decoder",
    "decode_kwargs",
    "compile_by_default",
    "fuse_siblings",
    "unfuse",
]
