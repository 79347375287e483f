"""The E8P lattice codebook (QuIP#): 8 weights per 16-bit codeword index, one scale σ per matrix,

    W_hat[:, 8j:8j+8] = σ · codebook[codes[:, j]]

solved by LDLQ (rsq/solver/ldlq.py), the codebook in rsq/quant/e8p.py. Always 2 bits per weight;
no serving format holds the codebook. This file declares everything that runs it:

* :class:`E8PLinear`, its module. Buffers: ``codes`` int16 (out, in/8; the bit pattern of the
  unsigned 16-bit index), ``scales`` (1, 1) float32, ``bias`` (out,) in the compute dtype.
* its kernel backends (:data:`BACKENDS`), all with the signature
  ``fn(x2d (M, 8C), codes (out, C), scales (1, 1), bias | None in x's dtype) -> (M, out)``: the
  Triton decode kernels of rsq/kernels/triton_e8p.py for bf16/fp16 on CUDA (GEMV for one token,
  tensor-core tiles up to 64, decode + cuBLAS beyond) and the pure-torch :func:`reference_matmul`
  (any device and dtype; it takes x with its leading dims, ``flatten=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rsq.errors import ConfigError
from rsq.formats.base import NumberFormat, register_format
from rsq.kernels.backends import ANY_DTYPE, HALF, Backend, register_backend
from rsq.nn.linear import QuantizedLinear
from rsq.quant import e8p as E
from rsq.solver.ldlq import e8p_sigma

_NO_EXPORT = (
    "the e8p grid cannot be exported to {target}: it holds 2-bit uniform integers at most, no E8P lattice "
    "codebook; re-quantize with --grid uniform"
)


class E8PLinear(QuantizedLinear):
    format_name = "e8p"

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.bfloat16):
        super().__init__(in_features, out_features, bits=2, group_size=-1)
        self.register_buffer("codes", torch.zeros(out_features, in_features // E.CODE_DIM, dtype=torch.int16))
        self.register_buffer("scales", torch.ones(1, 1, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)

    @classmethod
    def empty(cls, in_features, out_features, bias, dtype=torch.bfloat16):
        return cls(in_features, out_features, bias, dtype)

    def kernel_inputs(self, x):
        return (self.codes, self.scales), None if self.bias is None else self.bias.to(x.dtype)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return E.e8p_dequantize(self.codes, self.scales).to(dtype)


def reference_matmul(x, codes, scales, bias):
    """x (..., 8C) @ W_hat^T + bias: the codebook decode of rsq/quant/e8p.py in float32, rounded to
    x's dtype, then F.linear (the oracle of the Triton kernels)."""
    return F.linear(x, E.e8p_dequantize(codes, scales).to(x.dtype), bias)


_TRITON = dict(
    format_name="e8p",
    bits=(2,),
    dtypes=HALF,
    device_types=("cuda",),
    requires=("triton",),
    keywords=(),
)

BACKENDS = (
    # one token: CUDA cores, one program per BLOCK_N rows over all of K
    Backend(name="triton_e8p_gemv", function="rsq.kernels.triton_e8p:gemv", m_max=1, priority=30, **_TRITON),
    # M <= 64: decoded tiles as the A operand of tl.dot, split-K
    Backend(
        name="triton_e8p_small",
        function="rsq.kernels.triton_e8p:matmul_small",
        m_min=2,
        m_max=64,
        priority=20,
        **_TRITON,
    ),
    # prefill: decode the whole weight to bf16/fp16, then cuBLAS
    Backend(
        name="triton_e8p_dequant_mm", function="rsq.kernels.triton_e8p:dequant_matmul", m_min=65, priority=15, **_TRITON
    ),
    Backend(
        name="reference",
        format_name="e8p",
        function=reference_matmul,
        bits=(2,),
        dtypes=ANY_DTYPE,
        device_types=("cpu", "cuda"),
        m_min=0,
        priority=-100,
        flatten=False,
        keywords=(),
    ),
)


class E8P(NumberFormat):
    name = "e8p"
    bits = (2,)
    default_bits = 2
    solver = "ldlq"
    stackable = False  # σ is one scale per matrix: stacking would share it between matrices
    zero_rows_exact = False  # the codebook has no all-zero point: a zero row quantizes to nonzero values
    tensor_keys = ("codes", "scales")
    exports = {t: _NO_EXPORT.format(target=t) for t in ("compressed-tensors", "gptq")}

    def validate(self, grid):
        if grid.bits != 2:
            raise ConfigError(f"the e8p grid is 2 bits per weight, got --bits {grid.bits}: use --bits 2")

    def check_width(self, grid, in_features, name=""):
        if in_features % E.CODE_DIM:
            raise ConfigError(
                f"the e8p grid quantizes 8 weights at a time, but {name or 'this layer'} has input "
                f"width {in_features}, not a multiple of 8: use a scalar grid (--grid uniform/nf) for it"
            )

    def rtn(self, W, grid, kernels="auto"):
        rows, cols = W.shape
        self.check_width(grid, cols)
        sigma = e8p_sigma(W, grid.e8p_scale)
        scale = torch.tensor([[sigma]], dtype=torch.float32, device=W.device)
        Wr = W.float() / sigma if sigma > 0 else torch.zeros_like(W, dtype=torch.float32)
        idx, _ = E.e8p_round(Wr.reshape(-1, E.CODE_DIM))
        codes = idx.reshape(rows, cols // E.CODE_DIM)
        return codes, scale, torch.zeros(1, 1, device=W.device), E.e8p_dequantize(codes, scale)

    def dequantize(self, codes, scale, zero, bits):
        return E.e8p_dequantize(codes, scale)

    def stored_tensors(self, res, grid, dtype):
        return {"codes": E.codes_to_int16(res.codes), "scales": res.scale.reshape(1, 1).float()}

    def empty_module(self, in_features, out_features, bits, group_size, bias, dtype):
        return E8PLinear.empty(in_features, out_features, bias, dtype)


register_format(E8P())
for _backend in BACKENDS:
    register_backend(_backend)
