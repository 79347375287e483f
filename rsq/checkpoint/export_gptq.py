"""Export an rsq checkpoint directory to the GPTQ layout (AutoGPTQ / GPTQModel ``checkpoint_format:
gptq``, "v1"), which transformers (through gptqmodel / optimum), vLLM (``gptq``, ``gptq_marlin``) and
SGLang load. Registered as ``gptq`` in rsq/checkpoint/exporters.py. The layout holds 2, 3, 4 and 8 bits;
vLLM 0.32 serves only (4, symmetric) and (8, symmetric) GPTQ checkpoints (``gptq`` config's TYPE_MAP),
so a 2/3-bit export is for transformers + gptqmodel; vLLM takes rsq's 2/3 bits through compressed-tensors.

Per quantized linear ``P`` (in -> out features, G groups of ``group_size`` inputs; per channel: G = 1):

    P.qweight  int32 (in * bits / 32, out)   codes packed along the input dim: the 32 codes of
                                             inputs 32r..32r+31 of column o form a little-endian
                                             string of 32*bits bits in words bits*r.. (code k at
                                             bits [k*bits, (k+1)*bits)); 3-bit codes straddle words
    P.qzeros   int32 (G, out * bits / 32)    zero points minus one, packed the same way along out
    P.scales   float16 (G, out)
    P.g_idx    int32 (in,)                   group of each input (k // group_size; no act-order)
    P.bias     float16 (out,)                when the linear has one

    w[o, k] = scales[g, o] * (q[k, o] - (qzeros[g, o] + 1)),   g = g_idx[k]

rsq stores codes c in [0, 2^bits - 1] and zeros z with w = scales * (c - z), packed along the input
dim of each output row in the same little-endian run layout (rsq/quant/pack.py), so GPTQ's qweight
is rsq's transposed and its qzeros are z - 1 packed along the output dim. Scales and the float
tensors are written in float16 (GPTQ's dtype; the only change to the function, ~2^-11 relative per
scale). "v1" cannot hold a zero point of 0 (z - 1 wraps; loaders add one back unmasked): such a
checkpoint is refused, naming the symmetric grid (z = 2^(bits-1)) that always exports.

Refused, with the reason (rsq/checkpoint/exporters.py's shared checks): grids other than uniform
(NormalFloat, E8P), widths other than 2/3/4/8, and online rotations (the GPTQ layout runs plain
linears: quantize with --online-rotations none); here: zero points of 0 and widths not multiples of 32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rsq.checkpoint.card import write_model_card
from rsq.checkpoint.exporters import open_export, write_export_dir, write_provenance, write_weights
from rsq.checkpoint.load import read_checkpoint_tensors
from rsq.errors import ExportError
from rsq.quant.pack import pack_codes, unpack_codes

NAME = "gptq"  # the exporter's name in rsq/checkpoint/exporters.py


def convert_linear_gptq(prefix: str, tensors: dict[str, torch.Tensor], in_features: int, qc: dict) -> dict:
    """The GPTQ tensors of one rsq uniform-grid linear."""
    bits, group = qc["bits"], qc["group_size"]
    qweight = tensors[f"{prefix}.qweight"]
    zeros = tensors[f"{prefix}.qzeros"].to(torch.int64)  # (out, G)
    out_features = qweight.shape[0]
    if in_features % 32 or out_features % 32:
        raise ExportError(
            f"{prefix} is {out_features}x{in_features}: the GPTQ layout packs 32 inputs and 32 outputs per "
            f"run of {bits} words, so both widths must be multiples of 32"
        )
    if bool((zeros == 0).any()):
        raise ExportError(
            f"{prefix} has zero points equal to 0, which GPTQ's checkpoint_format 'gptq' stores as zero - 1 and "
            "cannot hold; re-quantize with a symmetric grid (drop --asym), whose zero points are 2^(bits-1)"
        )
    codes = unpack_codes(qweight, bits, in_features)  # (out, in): checks the packed width
    out = {
        "qweight": pack_codes(codes, bits).T.contiguous(),  # (in * bits / 32, out)
        "qzeros": pack_codes(zeros.T - 1, bits).contiguous(),  # (G, out * bits / 32)
        "scales": tensors[f"{prefix}.scales"].T.to(torch.float16).contiguous(),  # (G, out)
        "g_idx": torch.arange(in_features, dtype=torch.int32) // (in_features if group == -1 else group),
    }
    if not torch.isfinite(out["scales"]).all():
        raise ExportError(f"{prefix}: scales overflow float16; GPTQ stores float16 scales")
    if f"{prefix}.bias" in tensors:
        out["bias"] = tensors[f"{prefix}.bias"].to(torch.float16)
    return out


def check_all_quantized(qc: dict, linears: dict[str, int]) -> None:
    """ExportError unless every linear of a decoder block is quantized: the GPTQ config quantizes
    every linear of every block, so a linear kept in float there (``--unrotated-outliers
    keep-float``, issue 33) has no place in this layout; compressed-tensors lists it as ignored."""
    blocks = {m.rsplit(".", 2)[0] for m in qc["modules"]}
    quantized = set(qc["modules"])
    kept = sorted(n for n in linears if n not in quantized and n.rsplit(".", 2)[0] in blocks)
    if kept:
        more = f" and {len(kept) - 1} more" if len(kept) > 1 else ""
        raise ExportError(
            f"{kept[0]}{more} is kept unquantized (--unrotated-outliers keep-float), which the GPTQ layout cannot "
            "hold (its config quantizes every linear of a decoder block): export --format compressed-tensors, "
            "which lists it under ignore, or re-quantize with --unrotated-outliers off"
        )


def gptq_quantization_config(qc: dict) -> dict:
    return {
        "quant_method": "gptq",
        "bits": qc["bits"],
        "group_size": qc["group_size"],
        "desc_act": False,  # codes and groups are in natural column order (rsq's act-order is static)
        "sym": bool(qc["symmetric"]),
        "checkpoint_format": "gptq",
        "static_groups": False,
        "true_sequential": True,
        "lm_head": False,
        "damp_percent": (qc.get("rsq_config") or {}).get("solver", {}).get("damp_frac", 0.01),
        "quantizer": [f"rsq:{qc.get('rsq_version', '')}"],
    }


def export_gptq(src: str | Path, out: str | Path, overwrite: bool = False) -> dict:
    """Write ``out``: the rsq checkpoint ``src`` in the GPTQ layout (temporary sibling, then renamed)."""
    src, out = Path(src), Path(out)
    config, qc, linears = open_export(src, out, overwrite, NAME)
    check_all_quantized(qc, linears)
    tensors = read_checkpoint_tensors(src)
    quantized = set(qc["modules"])
    result = {
        n: (t.to(torch.float16) if t.is_floating_point() else t)
        for n, t in tensors.items()
        if n.rsplit(".", 1)[0] not in quantized
    }
    for prefix in qc["modules"]:
        for key, t in convert_linear_gptq(prefix, tensors, linears[prefix], qc).items():
            result[f"{prefix}.{key}"] = t
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    config["quantization_config"] = gptq_quantization_config(qc)
    config["dtype"] = "float16"
    config.pop("torch_dtype", None)

    def write(tmp: Path) -> None:
        write_weights(result, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        write_provenance(tmp, NAME, qc)
        write_model_card(src, tmp, qc, NAME, name=out.name)

    write_export_dir(src, out, write)
    return {
        "format": "gptq",
        "bits": qc["bits"],
        "group_size": qc["group_size"],
        "symmetric": bool(qc["symmetric"]),
        "modules": len(qc["modules"]),
        "bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
    }
