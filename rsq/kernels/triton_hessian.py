"""The weighted activations of the GPU Hessian product, split into half-precision hi + lo parts, in
one pass (rsq.solver.hessian.HessianAccumulator._add_half).

H += Xᵀ (w ⊙ X) runs on the tensor cores as Xᵀ·hi + Xᵀ·lo with y = w ⊙ x in float32,
hi = half(y), lo = half(y - hi): the weighting is exact to ~2^-16 relative. In torch this is six
elementwise passes over a (tokens, width) float32 tensor (the cast, the product, two casts, the
difference, the last cast: ~50 bytes of traffic per element, ~0.3 s per Llama-3-8B layer at 256 x
4096 tokens); here it is one read of x and two half writes (6 bytes). hi is bit-identical to the
torch form's (the same float32 product and round-to-nearest-even cast); lo may differ in its last
bit: the compiler may contract x·w − hi into one FMA, i.e. round the exact x·w − hi once instead of
the rounded product, so hi + lo is never further from w·x than the torch form's.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _split_kernel(X, Wt, HI, LO, rows, d, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, WITH_LO: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (r < rows)[:, None] & (c < d)[None, :]
    offs = r[:, None].to(tl.int64) * d + c[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0)
    w = tl.load(Wt + r, mask=r < rows, other=0.0)
    y = x.to(tl.float32) * w[:, None]
    hi = y.to(HI.dtype.element_ty)
    tl.store(HI + offs, hi, mask=mask)
    if WITH_LO:
        lo = (y - hi.to(tl.float32)).to(LO.dtype.element_ty)
        tl.store(LO + offs, lo, mask=mask)


def split_weighted(
    x: torch.Tensor, w: torch.Tensor, with_lo: bool = True, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """hi, lo (each of x's shape, in ``out_dtype``, default x's) with hi + lo = w[:, None] * x to
    ~2^-16 relative. x: (M, d) contiguous bf16/fp16; w: (M,) float32, on x's device. ``with_lo``
    False: (hi, None), hi alone written."""
    if x.dim() != 2 or not x.is_contiguous() or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("split_weighted takes a contiguous (M, d) bf16/fp16 tensor")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("split_weighted runs on CUDA (or in Triton's interpreter)")
    rows, d = x.shape
    w = w.reshape(-1).to(x.device, torch.float32).contiguous()
    out_dtype = out_dtype or x.dtype
    if out_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError("split_weighted writes bf16/fp16 parts")
    hi = torch.empty_like(x, dtype=out_dtype)
    lo = torch.empty_like(x, dtype=out_dtype) if with_lo else None
    block_r, block_d = 16, 256
    _split_kernel[(triton.cdiv(rows, block_r), triton.cdiv(d, block_d))](
        x, w, hi, lo if with_lo else hi, rows, d, BLOCK_R=block_r, BLOCK_D=block_d, WITH_LO=with_lo, num_warps=4
    )
    return hi, lo
