"""The uniform integer grid: codes c in [0, 2^bits - 1] with a per-(row, group) scale and zero point,

    W_hat = scales * (c - qzeros)

stored as ``qweight`` (int32, codes packed densely along the input dim, rsq/quant/pack.py),
``scales`` (out, n_groups, the model dtype) and ``qzeros`` (uint8, out × n_groups), run by
:class:`rsq.nn.qlinear.QuantLinear` through the kernel backends of rsq/kernels/__init__.py, solved
by GPTQ, exported to compressed-tensors and GPTQ (rsq/checkpoint/exporters.py: 2/3/4/8 bits both).
"""

from __future__ import annotations

import torch

from rsq.formats.base import NumberFormat, ScalarOps, register_format
from rsq.kernels import has_triton
from rsq.quant import grid as G
from rsq.quant.pack import SUPPORTED_BITS, pack_codes, pack_scales, pack_zeros


def find_params(w: torch.Tensor, grid, kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale/zero (rows, 1) of :func:`rsq.quant.grid.find_params`; with ``kernels="auto"``
    the MSE clip search of a CUDA tensor runs as one Triton kernel (rsq/kernels/triton_scales.py,
    tested against the torch loop)."""
    if grid.mse_clip and w.is_cuda and kernels == "auto" and has_triton():
        from rsq.kernels.triton_scales import clip_search

        scale, zero = clip_search(w.float(), grid.bits, grid.symmetric, grid.clip_grid, grid.max_shrink, grid.clip_norm)
        return scale[:, None], zero[:, None]
    return G.find_params(w, grid)


def find_group_params(w: torch.Tensor, grid, kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero (rows, n_groups) for every group, the search as :func:`find_params`."""
    return G.find_group_params(w, grid, find=lambda wg, g: find_params(wg, g, kernels))


class UniformOps(ScalarOps):
    fused_gptq = True

    def params(self, W):
        return find_params(W, self.grid, self.kernels)

    def group_params(self, W):
        return find_group_params(W, self.grid, self.kernels)

    def round(self, w, s, z):
        c = G.quantize_codes(w, s, z, self.grid.bits)
        return c, G.dequantize_codes(c, s, z)


class Uniform(NumberFormat):
    name = "uniform"
    bits = SUPPORTED_BITS
    solver = "gptq"
    stackable = True
    tensor_keys = ("qweight", "scales", "qzeros")
    exports = {"compressed-tensors": None, "gptq": None}

    def ops(self, grid, device, kernels="auto"):
        return UniformOps(grid, device, kernels)

    def rtn(self, W, grid, kernels="auto"):
        return G.rtn_quantize(W.float(), grid, find=lambda wg, g: find_params(wg, g, kernels))

    def dequantize(self, codes, scale, zero, bits):
        return G.dequantize_grouped(codes, scale, zero)

    def stored_tensors(self, res, grid, dtype):
        return {
            "qweight": pack_codes(res.codes, grid.bits),
            "scales": pack_scales(res.scale, dtype),
            "qzeros": pack_zeros(res.zero, grid.bits),
        }

    def empty_module(self, in_features, out_features, bits, group_size, bias, dtype):
        from rsq.nn.qlinear import QuantLinear

        return QuantLinear.empty(in_features, out_features, bits, group_size, bias, dtype)

    def backends(self):
        from rsq.kernels import BACKENDS

        return tuple(b.name for b in BACKENDS)


register_format(Uniform())
