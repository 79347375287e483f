"""The E8P lattice codebook (QuIP#): 8 weights per 16-bit codeword index, one scale σ per matrix,

    W_hat[:, 8j:8j+8] = σ · codebook[codes[:, j]]

stored as ``codes`` (int16 bit pattern of the unsigned index, out × in/8) and ``scales`` (1 × 1,
float32), run by :class:`rsq.nn.vqlinear.E8PLinear` (Triton decode kernels on CUDA), solved by
LDLQ (rsq/solver/ldlq.py). Always 2 bits per weight; no serving format holds the codebook.
"""

from __future__ import annotations

import torch

from rsq.errors import ConfigError
from rsq.formats.base import NumberFormat, register_format
from rsq.quant import e8p as E

_NO_EXPORT = (
    "the e8p grid cannot be exported to {target}: it holds 2-bit uniform integers at most, no E8P lattice "
    "codebook; re-quantize with --grid uniform"
)


class E8P(NumberFormat):
    name = "e8p"
    bits = (2,)
    default_bits = 2
    solver = "ldlq"
    stackable = False  # σ is one scale per matrix: stacking would share it between matrices
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
        from rsq.solver.ldlq import e8p_sigma

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
        from rsq.nn.vqlinear import E8PLinear

        return E8PLinear.empty(in_features, out_features, bias, dtype)

    def backends(self):
        return ("triton_e8p", "reference")


register_format(E8P())
