"""The NormalFloat grid: codes index 2^bits NormalFloat levels (rsq/quant/nf.py), one symmetric
absmax scale per (row, group),

    W_hat = scales * levels[c]

stored as ``qweight`` (codes packed as the uniform grid's) and ``scales`` (out, n_groups), run by
:class:`rsq.nn.vqlinear.NFQuantLinear` (pure torch), solved by GPTQ. No serving format holds
NormalFloat levels, so nothing exports.
"""

from __future__ import annotations

import torch

from rsq.config import replace
from rsq.formats.base import NumberFormat, ScalarOps, register_format
from rsq.quant import nf as N
from rsq.quant.pack import SUPPORTED_BITS, pack_codes, pack_scales

_NO_EXPORT = (
    "the nf grid cannot be exported to {target}: its integer grids are uniform (w = scale * (q - zero)) "
    "and have no NormalFloat levels; re-quantize with --grid uniform"
)


class NFOps(ScalarOps):
    def __init__(self, grid, device, kernels="auto"):
        super().__init__(grid, device, kernels)
        self.levels = N.nf_levels(grid.bits).to(device)

    def params(self, W):
        scale = N.nf_find_params(W, replace(self.grid, group_size=-1))
        return scale, torch.zeros_like(scale)

    def group_params(self, W):
        scale = N.nf_find_params(W, self.grid)
        return scale, torch.zeros_like(scale)

    def round(self, w, s, z):
        c = N.nf_quantize_codes(w, s, self.levels)
        return c.float(), N.nf_dequantize(c, s, self.levels)


class NormalFloat(NumberFormat):
    name = "nf"
    bits = SUPPORTED_BITS
    solver = "gptq"
    stackable = True
    tensor_keys = ("qweight", "scales")
    exports = {t: _NO_EXPORT.format(target=t) for t in ("compressed-tensors", "gptq")}

    def ops(self, grid, device, kernels="auto"):
        return NFOps(grid, device, kernels)

    def rtn(self, W, grid, kernels="auto"):
        codes, scale, w_hat = N.nf_rtn_quantize(W.float(), grid)
        return codes, scale, torch.zeros_like(scale), w_hat

    def dequantize(self, codes, scale, zero, bits):
        return N.nf_dequantize_grouped(codes, scale, bits)

    def stored_tensors(self, res, grid, dtype):
        return {"qweight": pack_codes(res.codes, grid.bits), "scales": pack_scales(res.scale, dtype)}

    def empty_module(self, in_features, out_features, bits, group_size, bias, dtype):
        from rsq.nn.vqlinear import NFQuantLinear

        return NFQuantLinear.empty(in_features, out_features, bits, group_size, bias, dtype)


register_format(NormalFloat())
