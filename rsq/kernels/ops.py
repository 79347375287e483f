"""rsq's inference kernels as ``torch.library`` custom ops, so ``torch.compile`` sees each quantized
matmul and online Hadamard as one opaque operator instead of tracing (and breaking on) the
Python that picks a backend, launches Triton or builds cached tables.

* ``rsq::quant_linear``: the matmul of a quantized linear of any number format
  (:func:`rsq.kernels.backends.run_backend` picks the format's backend per call, its pure-torch
  reference on CPU);
* ``rsq::hadamard``: an online Hadamard rotation (``full``, ``cross_head`` or ``block``; the
  Triton kernel where it supports the size, else the torch transform: rsq/kernels/hadamard.py).

Each op's fake (meta) function gives the output's shape and dtype only, which is all the compiler
needs. The modules call these ops only while compiling (``torch.compiler.is_compiling()``); eager
calls keep the direct Python path, which costs less per call than the op dispatcher. The ops hold
no state and never mutate their inputs; outputs are fresh tensors (never views of an input).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rsq.kernels.backends import Layer, run_backend
from rsq.kernels.hadamard import hadamard_rotate


@torch.library.custom_op("rsq::quant_linear", mutates_args=())
def quant_linear(
    x: Tensor,
    tensors: list[Tensor],
    bias: Tensor | None,
    format_name: str,
    shape: list[int],
    backend: str | None,
) -> Tensor:
    """y (..., out) = x (..., in) @ W_hat^T + bias for a layer of ``format_name`` whose packed buffers
    are ``tensors`` (the format's order); ``shape`` = [bits, in_features, group_size, out_features];
    backend: None = the fastest that matches."""
    bits, in_features, group_size, out_features = shape
    layer = Layer(format_name, bits, group_size, in_features, out_features)
    return run_backend(x, tensors, bias, layer, backend)


@quant_linear.register_fake
def _(x, tensors, bias, format_name, shape, backend):
    return x.new_empty(*x.shape[:-1], shape[3])


@torch.library.custom_op("rsq::hadamard", mutates_args=())
def hadamard(x: Tensor, kind: str, size: int, head_dim: int) -> Tensor:
    """An online Hadamard rotation of x's last dim (rsq/rotation/online.py documents the kinds)."""
    y = hadamard_rotate(x, kind, size, head_dim)
    return y.clone() if y.data_ptr() == x.data_ptr() else y  # an op's output may not alias its input


@hadamard.register_fake
def _(x, kind, size, head_dim):
    return torch.empty_like(x)
