"""rsq's inference kernels as ``torch.library`` custom ops, so ``torch.compile`` sees each quantized
matmul and online Hadamard as one opaque operator instead of tracing (and breaking on) the
Python that picks a backend, launches Triton or builds cached tables.

* ``rsq::wq_linear``: a uniform-grid QuantLinear's matmul (:func:`rsq.kernels.run_backend`
  picks the backend per call, the reference on CPU);
* ``rsq::e8p_linear``: an E8PLinear's matmul (Triton decode kernels on CUDA bf16/fp16, else the
  reference decode + F.linear);
* ``rsq::hadamard``: an online Hadamard rotation (``full``, ``cross_head`` or ``block``; the
  Triton kernel where it supports the size, else the torch transform).

Each op's fake (meta) function gives the output's shape and dtype only, which is all the compiler
needs. The modules call these ops only while compiling (``torch.compiler.is_compiling()``); eager
calls keep the direct Python path, which costs less per call than the op dispatcher. The ops hold
no state and never mutate their inputs; outputs are fresh tensors (never views of an input).
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.library.custom_op("rsq::wq_linear", mutates_args=())
def wq_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    qzeros: Tensor,
    bias: Tensor | None,
    bits: int,
    in_features: int,
    group_size: int,
    backend: str | None,
) -> Tensor:
    """y (M, out) = x (M, in) @ W_hat^T + bias for packed uniform codes (backend: None = fastest)."""
    from rsq.kernels import run_backend

    return run_backend(x, qweight, scales, qzeros, bias, bits, in_features, group_size, backend)


@wq_linear.register_fake
def _(x, qweight, scales, qzeros, bias, bits, in_features, group_size, backend):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("rsq::e8p_linear", mutates_args=())
def e8p_linear(x: Tensor, codes: Tensor, scales: Tensor, bias: Tensor | None) -> Tensor:
    """y (..., out) = x (..., 8C) @ W_hat^T + bias for E8P codes (out, C), scale (1, 1)."""
    from rsq.nn.vqlinear import e8p_forward

    return e8p_forward(x, codes, scales, bias)


@e8p_linear.register_fake
def _(x, codes, scales, bias):
    return x.new_empty(*x.shape[:-1], codes.shape[0])


@torch.library.custom_op("rsq::hadamard", mutates_args=())
def hadamard(x: Tensor, kind: str, size: int, head_dim: int) -> Tensor:
    """An online Hadamard rotation of x's last dim (rsq/rotation/online.py documents the kinds)."""
    from rsq.rotation.online import hadamard_rotate

    y = hadamard_rotate(x, kind, size, head_dim)
    return y.clone() if y.data_ptr() == x.data_ptr() else y  # an op's output may not alias its input


@hadamard.register_fake
def _(x, kind, size, head_dim):
    return torch.empty_like(x)
