"""The NormalFloat grid: codes index 2^bits NormalFloat levels (rsq/quant/nf.py), one symmetric
absmax scale per (row, group),

    W_hat = scales * levels[c]

solved by GPTQ. No serving format holds NormalFloat levels, so nothing exports. This file declares
everything that runs it:

* :class:`NFQuantLinear`, its module. Buffers: ``qweight`` int32 (out, ceil(in/32)*bits), the level
  indices packed as the uniform grid's codes; ``scales`` (out, n_groups); ``bias``.
* its one kernel backend, the pure-torch :func:`reference_matmul` (any device), with the signature
  ``fn(x (..., in), qweight, scales, bias | None in x's dtype, *, bits, in_features, group_size)``
  (``flatten=False``: x keeps its leading dims). A faster kernel for NF takes x2d (M, in) and
  returns (M, out), as the uniform format's do.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsq.config import replace
from rsq.formats.base import NumberFormat, ScalarOps, register_format
from rsq.kernels.backends import ANY_DTYPE, Backend, register_backend
from rsq.nn.linear import QuantizedLinear
from rsq.quant import nf as N
from rsq.quant.pack import SUPPORTED_BITS, pack_codes, pack_scales, packed_width, unpack_codes

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


class NFQuantLinear(QuantizedLinear):
    format_name = "nf"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__(in_features, out_features, bits, group_size)
        groups = 1 if group_size == -1 else in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def empty(cls, in_features, out_features, bits, group_size, bias, dtype=torch.bfloat16):
        return cls(in_features, out_features, bits, group_size, bias, dtype)

    def kernel_inputs(self, x):
        return (self.qweight, self.scales), None if self.bias is None else self.bias.to(x.dtype)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.bits, self.in_features).to(dtype)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """W_hat (out, in) float32 from the stored buffers."""
    return N.nf_dequantize_grouped(unpack_codes(qweight, bits, in_features), scales, bits)


def reference_matmul(x, qweight, scales, bias, *, bits, in_features, group_size):
    """x (..., in) @ W_hat^T + bias, W_hat rounded to x's dtype (pure torch, any device)."""
    return F.linear(x, dequantize(qweight, scales, bits, in_features).to(x.dtype), bias)


BACKENDS = (
    Backend(
        name="reference",
        format_name="nf",
        function=reference_matmul,
        bits=SUPPORTED_BITS,
        dtypes=ANY_DTYPE,
        device_types=("cpu", "cuda"),
        m_min=0,
        priority=-100,
        flatten=False,
    ),
)


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
        return NFQuantLinear.empty(in_features, out_features, bits, group_size, bias, dtype)


register_format(NormalFloat())
for _backend in BACKENDS:
    register_backend(_backend)
