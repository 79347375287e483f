"""The uniform format's pure-torch matmul, the oracle of its kernel backends (rsq/formats/uniform.py
declares them): unpack, dequantize, matmul in torch.

    W_hat[n, k] = scales[n, g(k)] * (code[n, k] - qzeros[n, g(k)]),   g(k) = k // group_size
    y = x @ W_hat^T + bias

computed in float32 (any device), the result cast to x's dtype. Slow but exact up to float32
rounding; also the CPU backend.
"""

from __future__ import annotations

import torch

from rsq.quant.grid import dequantize_grouped
from rsq.quant.pack import unpack_codes


def group_width(in_features: int, group_size: int) -> int:
    """Columns per group (group_size == -1: the whole row is one group)."""
    return in_features if group_size == -1 else group_size


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, *, bits: int, in_features: int, group_size: int
) -> torch.Tensor:
    """W_hat (out, in) float32 from packed codes (out, words), scales and zeros (out, n_groups)."""
    return dequantize_grouped(unpack_codes(qweight, bits, in_features), scales, qzeros)


def wq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    bits: int,
    in_features: int,
    group_size: int,
) -> torch.Tensor:
    """y (M, out) = x (M, in) @ W_hat^T + bias, in float32, returned in x.dtype."""
    w = dequantize(qweight, scales, qzeros, bits=bits, in_features=in_features, group_size=group_size)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
