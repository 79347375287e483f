"""Which implementation runs an online Hadamard rotation (rsq/rotation/online.py describes the
kinds): the Triton kernel of rsq/kernels/triton_hadamard.py for bf16/fp16 on CUDA where it supports
the size (one read and one write of the activations; a block-diagonal rotation as the full one on
each block), else the torch transforms of rsq/rotation/hadamard.py (a float32 butterfly pass per
factor of two: ~2 log2(block) kernels over the whole tensor)."""

from __future__ import annotations

from typing import Callable

import torch

from rsq.kernels.backends import has_triton
from rsq.rotation.hadamard import block_hadamard_transform, hadamard_transform


def cross_head(
    x: torch.Tensor, heads: int, head_dim: int, rotate: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``rotate`` (an orthogonal map of a last dim of size ``heads``) applied across heads:
    x (..., heads * head_dim) viewed as (..., head_dim, heads), per position in the head."""
    shape = x.shape
    y = x.reshape(*shape[:-1], heads, head_dim).transpose(-1, -2)
    return rotate(y).transpose(-1, -2).reshape(shape)


def hadamard_rotate(x: torch.Tensor, kind: str, size: int, head_dim: int) -> torch.Tensor:
    """The Hadamard kinds (full, cross_head, block) of an online rotation on x's last dim: the
    Triton kernel for bf16/fp16 on CUDA where it supports the size, else the torch transform. The
    ``block`` kind (block ``head_dim``) is the full transform of order ``head_dim`` on every
    contiguous block, i.e. on the rows of x viewed as (-1, head_dim): the same kernel where it
    supports that order (export's down_proj blocks of 256-2048), the torch transform otherwise."""
    if kind == "block":
        block = head_dim
        if x.is_cuda and has_triton() and x.shape[-1] % block == 0:
            from rsq.kernels import triton_hadamard as TH

            if TH.supports(x, block):
                return TH.hadamard(x.reshape(-1, block), block).reshape(x.shape)
        return block_hadamard_transform(x, block)
    cross = kind == "cross_head"
    if x.is_cuda and has_triton():
        from rsq.kernels import triton_hadamard as TH

        if TH.supports(x, size, cross, head_dim):
            return TH.hadamard(x, size, cross, head_dim)
    if cross:
        return cross_head(x, size, head_dim, lambda y: hadamard_transform(y, size))
    return hadamard_transform(x, size)
