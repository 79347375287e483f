"""GPTQ's column loop for one sub-block of up to 16 columns as one Triton kernel (uniform grid).

rsq.solver.gptq._gptq_block visits a 128-column block in sub-blocks of INNER = 16 columns; in torch
each column costs ~20 small kernels (round, clamp, dequantize, error, loss, rank-1 update) on up to
28672 rows. Here one program holds BLOCK_R rows x 16 columns in registers and runs the whole
sub-block (measured on the H100: the solve stage 13% faster, bench/NOTES-speed.md):

    for each column i:  q = clamp(rint(w_i / s_i) + z_i, 0, maxq);  w_hat = s_i (q - z_i)
                        err = (w_i - w_hat) / U_ii;  loss += err^2 / 2
                        w_j -= err * U_ij  for the sub-block's later columns j > i

Same arithmetic as the torch loop (IEEE division, round half to even by the 1.5·2^23 trick)
except that the compiler may fuse the update's multiply and subtract into one FMA, so W_hat can
differ from the torch path in the last bit of intermediate values (and rarely a code at a rounding
tie); tests/kernels/test_gpu_solver.py compares the two (codes >= 99.9% equal, losses within 1e-3).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_WIDTH = 16


@triton.jit
def _sub_block_kernel(
    W_ptr,
    U_ptr,
    S_ptr,
    Z_ptr,
    C_ptr,
    Q_ptr,
    E_ptr,
    L_ptr,
    rows,
    width,
    maxq,
    stride_w,
    stride_ur,
    stride_uc,
    stride_sr,
    stride_sc,
    stride_zr,
    stride_zc,
    stride_o,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < rows
    c = tl.arange(0, BLOCK_W)
    cmask = c < width
    Wt = tl.load(W_ptr + r[:, None] * stride_w + c[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    loss = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i in tl.static_range(BLOCK_W):
        if i < width:
            w = tl.sum(tl.where(c[None, :] == i, Wt, 0.0), axis=1)
            s = tl.load(S_ptr + r * stride_sr + i * stride_sc, mask=rmask, other=1.0)
            z = tl.load(Z_ptr + r * stride_zr + i * stride_zc, mask=rmask, other=0.0)
            v = w / s  # IEEE division (div.rn.f32)
            # round half to even as torch.round: (v + 1.5·2^23) - 1.5·2^23 in float32, exact for
            # |v| < 2^22; larger |v| are clamped below anyway
            q = ((v + 12582912.0) - 12582912.0) + z
            q = tl.minimum(tl.maximum(q, 0.0), maxq)
            dq = s * (q - z)
            d = tl.load(U_ptr + i * stride_ur + i * stride_uc)
            err = (w - dq) / d
            loss += err * err / 2
            u = tl.load(U_ptr + i * stride_ur + c * stride_uc, mask=cmask & (c > i), other=0.0)
            Wt = Wt - err[:, None] * u[None, :]
            tl.store(C_ptr + r * stride_o + i, q, mask=rmask)
            tl.store(Q_ptr + r * stride_o + i, dq, mask=rmask)
            tl.store(E_ptr + r * stride_o + i, err, mask=rmask)
    prev = tl.load(L_ptr + r, mask=rmask, other=0.0)
    tl.store(L_ptr + r, prev + loss, mask=rmask)


def sub_block(W1, U1, S1, Z1, C1, Q1, E1, L1, maxq: int) -> None:
    """Run columns 0..w-1 of the views W1 (rows, w <= 16; unit column stride), U1 (w, w) and S1/Z1
    (rows, w) with any strides (U may be a transposed Cholesky factor, S/Z expanded), writing
    C1/Q1/E1 (rows, w views of one contiguous (rows, B) buffer) and adding each row's loss to L1
    (rows,). All float32 on one device."""
    rows, width = W1.shape
    if width > MAX_WIDTH or W1.stride(1) != 1 or C1.stride(1) != 1:
        raise ValueError("sub_block takes at most 16 columns with unit column stride")
    block_r = 32
    _sub_block_kernel[(triton.cdiv(rows, block_r),)](
        W1,
        U1,
        S1,
        Z1,
        C1,
        Q1,
        E1,
        L1,
        rows,
        width,
        float(maxq),
        W1.stride(0),
        U1.stride(0),
        U1.stride(1),
        S1.stride(0),
        S1.stride(1),
        Z1.stride(0),
        Z1.stride(1),
        C1.stride(0),
        BLOCK_R=block_r,
        BLOCK_W=MAX_WIDTH,
        num_warps=4,
    )
