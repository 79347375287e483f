"""Which implementation runs an online Hadamard rotation (rsq/rotation/online.py describes the
kinds): the Triton kernel of rsq/kernels/triton_hadamard.py for bf16/fp16 on CUDA where it supports
the size (one read and one write of the activations), else the torch transforms of
rsq/rotation/hadamard.py."""

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
    ``block`` kind always runs the torch transform: the Triton kernel rotates a whole row (or across
    heads), not contiguous blocks, and the block may be any Hadamard order (``--export-block``)."""
    if kind == "block":
        return block_hadamard_transform(x, head_dim)
    cross = kind == "cross_head"
    if x.is_cuda and has_triton():
        from rsq.kernels import triton_hadamard as TH

        if TH.supports(x, size, cross, head_dim):
            return TH.hadamard(x, size, cross, head_dim)
    if cross:
        return cross_head(x, size, head_dim, lambda y: hadamard_transform(y, size))
    return hadamard_transform(x, size)
