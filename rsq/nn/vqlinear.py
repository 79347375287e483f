"""Linear layers for the non-uniform grids: NormalFloat (packed level indices) and E8P (16-bit
lattice codewords, 8 weights each). Forward dequantizes with the pure-torch reference and calls
F.linear, except E8P with bf16/fp16 activations on CUDA, which runs the Triton decode kernels of
rsq/kernels/triton_e8p.py (decoding in registers; tested against this reference).

NFQuantLinear buffers: qweight int32 (out, ceil(in/32)*bits), scales (out, n_groups), bias.
    W_hat = scales[:, k // group] * levels[code]
E8PLinear buffers: codes int16 (out, in/8; the bit pattern of the unsigned 16-bit index, 2 bits
per weight), scales (1, 1) float32, bias.
    W_hat[:, 8j:8j+8] = scale * codebook[codes[:, j]]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rsq.kernels import has_triton, ops
from rsq.quant.pack import packed_width, unpack_codes


class NFQuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        groups = 1 if group_size == -1 else in_features // group_size
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def empty(cls, in_features, out_features, bits, group_size, bias, dtype=torch.bfloat16):
        return cls(in_features, out_features, bits, group_size, bias, dtype)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from rsq.quant.nf import nf_dequantize_grouped

        codes = unpack_codes(self.qweight, self.bits, self.in_features)
        return nf_dequantize_grouped(codes, self.scales, self.bits).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize_weight(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


class E8PLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("codes", torch.zeros(out_features, in_features // 8, dtype=torch.int16))
        self.register_buffer("scales", torch.ones(1, 1, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def empty(cls, in_features, out_features, bias, dtype=torch.bfloat16):
        return cls(in_features, out_features, bias, dtype)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from rsq.quant.e8p import e8p_dequantize

        return e8p_dequantize(self.codes, self.scales).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # one opaque op in the graph (rsq/kernels/ops.py)
            return ops.e8p_linear(x, self.codes, self.scales, self.bias)
        return e8p_forward(x, self.codes, self.scales, self.bias)


def e8p_forward(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., 8C) @ W_hat^T + bias: the Triton decode kernels for bf16/fp16 on CUDA, else the
    reference decode (rsq/quant/e8p.py) and F.linear."""
    bias = None if bias is None else bias.to(x.dtype)
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and has_triton():
        from rsq.kernels.triton_e8p import e8p_matmul

        return e8p_matmul(x, codes, scales, bias)
    from rsq.quant.e8p import e8p_dequantize

    return F.linear(x, e8p_dequantize(codes, scales).to(x.dtype), bias)
