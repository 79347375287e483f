"""The per-row MSE clip search of rsq.quant.grid.find_params as one Triton kernel.

For each row: xmin = min(min w, 0), xmax = max(max w, 0); for each shrink factor p in
{1, 1 - 1/grid, ...} (grid * max_shrink candidates) the grid's scale and zero for the range
[p·xmin, p·xmax], the error Σ |fake_quantize(w) - w|^norm, and the first candidate with the smallest
error wins (strict <, as the torch loop). In torch that is ~6 elementwise passes over every weight
per candidate plus a host sync (80 candidates: ~0.6 s per Llama-3-8B layer on an H100); here one
program holds BLOCK_R rows and runs every candidate over them, reading the rows from L2.

Same float32 operations as the torch loop (the candidates' p rounded to float32 as torch does,
IEEE division, round half to even, libdevice pow; exp2/log2 in Triton's CPU interpreter), except that the
compiler may fuse the dequantization's multiply with the subtraction of w (one FMA) and that the row sums add in another
order: errors differ in the last bits, so at a near-tie another candidate (of practically equal
error) can win. tests/kernels/test_triton_scales.py bounds both.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _round_half_even(v):
    # (v + 1.5·2^23) - 1.5·2^23 in float32 rounds to the nearest integer, ties to even, for |v| < 2^22
    return (v + 12582912.0) - 12582912.0


@triton.jit
def _scale_zero(lo, hi, maxq, half, SYM: tl.constexpr):
    if SYM:
        amax = tl.maximum(hi, -lo)
        s = tl.math.div_rn(amax, half - 1.0)
        s = tl.where(amax == 0, 1.0, s)
        z = tl.zeros_like(s) + half
    else:
        span = hi - lo
        s = tl.math.div_rn(span, maxq)
        s = tl.where(span == 0, 1.0, s)
        z = _round_half_even(tl.math.div_rn(-lo, s))
    return s, z


@triton.jit
def _clip_kernel(
    W,
    P,
    S,
    Z,
    rows,
    cols,
    n_cand,
    maxq,
    half,
    norm,
    SYM: tl.constexpr,
    LIBDEVICE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    base = W + r[:, None].to(tl.int64) * cols
    # tile-shaped running min/max/sum, reduced after each column loop (a row reduction inside the
    # loop trips Triton 3.6's thread-locality pass on sm_90)
    mn_t = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    mx_t = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m = rmask[:, None] & (c < cols)[None, :]
        x = tl.load(base + c[None, :], mask=m, other=0.0)
        mn_t = tl.minimum(mn_t, x)
        mx_t = tl.maximum(mx_t, x)
    mn = tl.min(mn_t, axis=1)
    mx = tl.max(mx_t, axis=1)
    best_s, best_z = _scale_zero(mn, mx, maxq, half, SYM)  # p = 1: kept if no error is finite
    best = tl.full((BLOCK_R,), float("inf"), dtype=tl.float32)
    for i in range(0, n_cand):
        p = tl.load(P + i)
        s, z = _scale_zero(p * mn, p * mx, maxq, half, SYM)
        err_t = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for c0 in range(0, cols, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = rmask[:, None] & (c < cols)[None, :]
            x = tl.load(base + c[None, :], mask=m, other=0.0)
            q = _round_half_even(tl.math.div_rn(x, s[:, None])) + z[:, None]
            q = tl.minimum(tl.maximum(q, 0.0), maxq)
            d = tl.abs((q - z[:, None]) * s[:, None] - x)
            if LIBDEVICE:
                e = libdevice.pow(d, norm)
            else:  # Triton's CPU interpreter has no libdevice
                e = tl.exp2(norm * tl.log2(d))
            err_t += tl.where(m & (d != 0), e, 0.0)
        err = tl.sum(err_t, axis=1)
        better = err < best
        best = tl.where(better, err, best)
        best_s = tl.where(better, s, best_s)
        best_z = tl.where(better, z, best_z)
    tl.store(S + r, best_s, mask=rmask)
    tl.store(Z + r, best_z, mask=rmask)


def clip_search(
    w: torch.Tensor, bits: int, symmetric: bool, clip_grid: int, max_shrink: float, clip_norm: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero (each (rows,), float32) of w (rows, cols) float32 on CUDA (or in
    Triton's interpreter), as find_params with mse_clip."""
    if w.dim() != 2 or w.dtype != torch.float32:
        raise ValueError("clip_search takes a (rows, cols) float32 tensor")
    if not w.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("clip_search runs on CUDA (or in Triton's interpreter)")
    w = w.contiguous()
    rows, cols = w.shape
    n = int(max_shrink * clip_grid)
    # p as the torch loop applies it: a Python float rounded to float32 by the tensor product
    p = torch.tensor([1 - i / clip_grid for i in range(n)], dtype=torch.float32, device=w.device)
    scale = torch.empty(rows, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    block_r = 4
    block_c = min(1024, triton.next_power_of_2(cols))
    _clip_kernel[(triton.cdiv(rows, block_r),)](
        w,
        p,
        scale,
        zero,
        rows,
        cols,
        n,
        float((1 << bits) - 1),
        float(1 << (bits - 1)),
        float(clip_norm),
        SYM=symmetric,
        LIBDEVICE=w.is_cuda,
        BLOCK_R=block_r,
        BLOCK_C=block_c,
        num_warps=4,
    )
    return scale, zero
