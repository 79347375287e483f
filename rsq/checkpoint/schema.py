"""The on-disk contract of an rsq checkpoint: tensor names, dtypes and shapes per grid kind.

uniform (2/3/4/8-bit): qweight int32 (out, ceil(in/32)*bits), scales (out, n_groups) model dtype,
    qzeros uint8 (out, n_groups); w_hat = scales * (code - qzeros).
nf: qweight as uniform (codes are NormalFloat level indices), scales (out, n_groups);
    w_hat = scales * levels[code] (levels from rsq.quant.nf.nf_levels(bits)).
e8p: codes int16 (out, in/8), the bit pattern of each unsigned 16-bit codeword index (2 bits per
    weight; int32 codes of older checkpoints load too), scales (1, 1); w_hat = scale * codebook[code].
"""

from __future__ import annotations

import torch

from rsq.config import GridConfig
from rsq.quant.grid import dequantize_codes, expand_groups
from rsq.solver.result import QuantResult

QUANT_METHOD = "rsq"
FORMAT_VERSION = 1

TENSOR_KEYS = {
    "uniform": ("qweight", "scales", "qzeros"),
    "nf": ("qweight", "scales"),
    "e8p": ("codes", "scales"),
}


def quantized_module_tensors(
    res: QuantResult, grid: GridConfig, bias: torch.Tensor | None, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The tensors stored for one quantized linear."""
    from rsq.quant.pack import pack_codes

    if grid.kind == "e8p":
        from rsq.quant.e8p import codes_to_int16

        out = {"codes": codes_to_int16(res.codes), "scales": res.scale.reshape(1, 1).float()}
    else:
        out = {"qweight": pack_codes(res.codes, grid.bits), "scales": res.scale.to(dtype)}
        if grid.kind == "uniform":
            out["qzeros"] = res.zero.to(torch.uint8)
    if bias is not None:
        out["bias"] = bias.detach()
    return out


def dequantize_result(res: QuantResult, grid: GridConfig) -> torch.Tensor:
    """W_hat (out, in) float32 from a result's codes and scales — equal to the solver's W_hat."""
    if grid.kind == "e8p":
        from rsq.quant.e8p import e8p_decode

        rows = res.codes.shape[0]
        return (e8p_decode(res.codes.reshape(-1)).reshape(rows, -1) * res.scale.reshape(())).float()
    cols = res.codes.shape[1]
    scale = expand_groups(res.scale.float(), cols)
    if grid.kind == "nf":
        from rsq.quant.nf import nf_levels

        return scale * nf_levels(grid.bits).to(scale.device)[res.codes.long()]
    return dequantize_codes(res.codes.float(), scale, expand_groups(res.zero.float(), cols))
