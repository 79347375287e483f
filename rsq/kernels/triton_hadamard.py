"""Online Hadamard transforms on the GPU as two small tensor-core products per row (Triton).

Every Hadamard rsq uses is H_n = H_K ⊗ sylvester(M) (rsq/rotation/hadamard.py), and Sylvester
matrices factor: sylvester(M) = sylvester(M1) ⊗ sylvester(M2). With a row x of length n viewed
row-major as a (P = K·M1) × Q (= M2) matrix X, (L ⊗ R)·x = L·X·Rᵀ, so one program per row loads X
once, computes Y = X·R (R symmetric) and Z = L·Y with L = H_K ⊗ sylvester(M1) (zero-padded to a power
of two), and writes Z/√n: one read and one write of the activations, no log2(n) passes.

The cross-head site (H_heads ⊗ I_head_dim, before o_proj) is the same kernel with X = (heads, head_dim)
and no right factor.

Precision: ±1 factors are exact in bf16/fp16 and both products accumulate in float32. The float32
Y is split into bf16 hi + lo (hi + lo carries 16 significant bits) for the second product, so the
result matches the float32 reference to ~2^-16 before the final rounding to the output dtype.

Support (:func:`supports`): bf16/fp16 on CUDA, Q a power of two in [16, 128], P <= 128 (n up to
16384, e.g. 4096 = 64·64, 14336 = (28·4)·128, 1536 = 12·128). Anything else (11008 = 172·64,
18944 = 37·512) uses the torch path.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

MAX_P = 128
MAX_Q = 128
MIN_DIM = 16  # tl.dot needs every dimension >= 16


@triton.jit
def _kron_kernel(
    x_ptr,
    y_ptr,
    l_ptr,
    r_ptr,
    P,
    scale,
    stride_x,
    stride_y,
    BP: tl.constexpr,
    Q: tl.constexpr,
    HAS_RIGHT: tl.constexpr,
    SPLIT: tl.constexpr,
):
    row = tl.program_id(0)
    i = tl.arange(0, BP)
    j = tl.arange(0, Q)
    mask = (i < P)[:, None]
    offs = i[:, None] * Q + j[None, :]
    X = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    L = tl.load(l_ptr + i[:, None] * BP + i[None, :])  # bf16 ±1, zero-padded to BP x BP
    if HAS_RIGHT:
        R = tl.load(r_ptr + j[:, None] * Q + j[None, :]).to(X.dtype)
        Y = tl.dot(X, R)  # float32
        if SPLIT:
            hi = Y.to(tl.bfloat16)
            lo = (Y - hi.to(tl.float32)).to(tl.bfloat16)
            Z = tl.dot(L, hi)
            Z = tl.dot(L, lo, Z)
        else:  # Triton's CPU interpreter (no bf16): float32 throughout
            Z = tl.dot(L.to(tl.float32), Y)
    else:
        Z = tl.dot(L.to(X.dtype), X)
    tl.store(y_ptr + row * stride_y + offs, (Z * scale).to(y_ptr.dtype.element_ty), mask=mask)


def factors(n: int, cross_head: bool = False, head_dim: int = 1) -> tuple[int, int] | None:
    """(rows P, columns Q) of the kernel's view of one row, or None where the kernel does not apply.

    full: n = P·Q with Q = min(M, 128); cross_head: P = heads (n), Q = head_dim, no right factor."""
    from rsq.errors import NoHadamardError
    from rsq.rotation.hadamard import hadamard_spec

    try:
        spec = hadamard_spec(n)
    except NoHadamardError:
        return None
    if cross_head:
        P, Q = n, head_dim
        ok = MIN_DIM <= Q <= MAX_Q and Q & (Q - 1) == 0
    else:
        Q = min(spec.power, MAX_Q)
        P = n // Q
        ok = Q >= MIN_DIM
    return (P, Q) if ok and P <= MAX_P else None


def supports(x: torch.Tensor, n: int, cross_head: bool = False, head_dim: int = 1) -> bool:
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and factors(n, cross_head, head_dim) is not None


@functools.lru_cache(maxsize=32)
def _factors_on(n: int, cross_head: bool, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(L zero-padded to a power of two >= 16, R) in bf16 on ``device`` (±1: exact)."""
    from rsq.rotation.hadamard import hadamard_matrix, two_factors

    L, R = (hadamard_matrix(n), None) if cross_head else two_factors(n, MAX_Q)
    bp = max(MIN_DIM, triton.next_power_of_2(L.shape[0]))
    padded = torch.zeros(bp, bp, dtype=torch.float64)
    padded[: L.shape[0], : L.shape[0]] = L
    L = padded.to(device=device, dtype=torch.bfloat16)
    return L, (L if R is None else R.to(device=device, dtype=torch.bfloat16))


def hadamard(x: torch.Tensor, n: int, cross_head: bool = False, head_dim: int = 1) -> torch.Tensor:
    """(H_n/√n)·x per row (full), or (H_n/√n ⊗ I_head_dim)·x with n heads of head_dim (cross_head).
    x: (..., n) or (..., n·head_dim), bf16/fp16 on CUDA; check :func:`supports` first."""
    P, Q = factors(n, cross_head, head_dim)
    width = P * Q
    if x.shape[-1] != width:
        raise ValueError(f"hadamard kernel: last dim {x.shape[-1]}, expected {width}")
    x2d = x.reshape(-1, width)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    y = torch.empty(x2d.shape, device=x.device, dtype=x.dtype)
    L, R = _factors_on(n, cross_head, str(x.device))
    if x2d.shape[0]:
        _kron_kernel[(x2d.shape[0],)](
            x2d,
            y,
            L,
            R,
            P,
            1.0 / math.sqrt(n),
            x2d.stride(0),
            y.stride(0),
            BP=L.shape[0],
            Q=Q,
            HAS_RIGHT=not cross_head,
            SPLIT=x.is_cuda,
            num_warps=8 if L.shape[0] * Q >= 8192 else 4,
        )
    return y.reshape(x.shape)
