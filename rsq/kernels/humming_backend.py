"""The uniform format's matmul through humming-kernels (vLLM's JIT-compiled GEMM library, PyPI
``humming-kernels``), the fastest backend measured for 2-2048 tokens (bench/NOTES-kernels.md).

humming's own weight layout for ``uint<bits>`` with a zero point is rsq's on-disk layout for the
codes (``weight`` (out, in * bits / 32) int32, codes packed densely along the input dim, little
endian) with ``weight_scale`` (out, n_groups) and the zero points packed densely along the *output*
dim (out * bits / 32, n_groups). So a QuantLinear's buffers convert without requantizing: the codes
are copied, the zeros repacked, and ``HummingLayer.transform()`` repacks everything for its kernels
(once per layer, at its first call on the GPU; it holds its own copy, about the packed weight's
bytes again). Each converted layer is checked once against the pure-torch reference
(rsq/kernels/reference.py) on a random probe; a layer that fails the check (or that humming cannot
build) is logged once and runs on rsq's Triton kernels instead, so the function computed never
changes.
"""

from __future__ import annotations

import logging
import threading

import torch

logger = logging.getLogger(__name__)

# (qweight ptr, shape, scales ptr, qzeros ptr, bias ptr) -> (the buffers, layer | None). The buffers are
# held so that their addresses cannot be reused by other tensors while the entry exists.
_LAYERS: dict[tuple, tuple] = {}
_LOCK = threading.Lock()
PROBE_TOL = 1e-2  # bf16 output and bf16-rounded products, against the float32 reference


def _key(qweight, scales, qzeros, bias) -> tuple:
    return (
        qweight.data_ptr(),
        tuple(qweight.shape),
        scales.data_ptr(),
        qzeros.data_ptr(),
        None if bias is None else bias.data_ptr(),
    )


def _pack_zeros_n(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 zeros (out, n_groups) -> int32 (out * bits / 32, n_groups), packed along out."""
    from rsq.quant.pack import pack_codes

    return pack_codes(qzeros.t().contiguous(), bits).t().contiguous()


def build_layer(qweight, scales, qzeros, bias, *, bits, in_features, group_size):
    """A transformed ``humming.layer.HummingLayer`` computing the same W_hat, or None (logged) when
    humming cannot build it or its output fails the probe against the reference."""
    from humming.layer import HummingLayer

    from rsq.kernels import reference

    out_features = qweight.shape[0]
    if in_features * bits % 32 or out_features * bits % 32 or qweight.shape[1] * 32 != in_features * bits:
        return None
    tensors = {"weight": qweight, "weight_scale": scales, "zero_point": _pack_zeros_n(qzeros, bits)}
    if bias is not None:
        tensors["bias"] = bias
    gen = torch.Generator(device=qweight.device).manual_seed(0)
    x = torch.randn(32, in_features, device=qweight.device, dtype=scales.dtype, generator=gen)
    want = reference.wq_matmul(
        x.float(), qweight, scales, qzeros, bias, bits=bits, in_features=in_features, group_size=group_size
    )
    try:
        layer = HummingLayer(
            shape_n=out_features,
            shape_k=in_features,
            weight_config={
                "dtype": f"uint{bits}",
                "group_size": 0 if group_size == -1 else group_size,
                "has_zero_point": True,
            },
            has_bias=bias is not None,
            torch_dtype=scales.dtype,
        ).to(qweight.device)
        layer.load_from_tensors({k: v.clone() for k, v in tensors.items()})
        layer.transform()
        y = layer(x)
        rel = ((y.float() - want).norm() / want.norm()).item()
    except Exception as exc:  # an unsupported shape or a failed JIT build: rsq's own kernels run it
        logger.warning(
            "humming could not build a %dx%d %d-bit layer (%s); using rsq's Triton kernels",
            out_features,
            in_features,
            bits,
            exc,
        )
        return None
    if not rel <= PROBE_TOL:
        logger.warning(
            "humming's %dx%d %d-bit layer differs from the reference (rel %.2e); using rsq's Triton kernels",
            out_features,
            in_features,
            bits,
            rel,
        )
        return None
    return layer


def layer_for(qweight, scales, qzeros, bias, *, bits, in_features, group_size):
    """The cached humming layer of these buffers (built on first use), or None."""
    key = _key(qweight, scales, qzeros, bias)
    entry = _LAYERS.get(key)
    if entry is None:
        with _LOCK:
            entry = _LAYERS.get(key)
            if entry is None:
                layer = build_layer(
                    qweight, scales, qzeros, bias, bits=bits, in_features=in_features, group_size=group_size
                )
                entry = _LAYERS[key] = ((qweight, scales, qzeros, bias), layer)
    return entry[1]


def forget(*tensors) -> None:
    """Drop the converted layers built from any of ``tensors`` (buffers replaced or freed: e.g. the
    members of a fused sibling group, rsq/generation/fusion.py), so their copies are freed."""
    ids = {id(t) for t in tensors if t is not None}
    with _LOCK:
        for key in [k for k, (bufs, _) in _LAYERS.items() if any(id(b) in ids for b in bufs if b is not None)]:
            del _LAYERS[key]


def clear_cache() -> None:
    """Forget every converted layer (their memory is freed with them)."""
    _LAYERS.clear()


def matmul(x, qweight, scales, qzeros, bias, *, bits, in_features, group_size):
    """y (M, out) = x (M, in) @ W_hat^T + bias through humming (rsq's Triton kernels where it cannot)."""
    layer = layer_for(qweight, scales, qzeros, bias, bits=bits, in_features=in_features, group_size=group_size)
    if layer is None:
        from rsq.kernels import triton_wq as T

        fn = T.matmul_small if x.shape[0] <= 64 else T.dequant_matmul
        return fn(x, qweight, scales, qzeros, bias, bits=bits, in_features=in_features, group_size=group_size)
    return layer(x)
