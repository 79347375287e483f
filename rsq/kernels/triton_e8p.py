"""Triton kernels for E8P-coded weights (2 bits per weight: one 16-bit codeword index per 8 weights).

Decoding follows the index layout of rsq/quant/e8p.py (``idx = a << 8 | h << 7 | s``) from a
256-entry int32 table, one entry per abs pattern: bits 2j..2j+1 hold v_j with a_j = v_j + 1/2
(v in {0, 1, 2}), bit 16 holds sum(a) mod 2. Per code: one table gather (1 KiB, L1-resident), the
parity of the 7 sign bits by xor folding, then per weight (v + 1/2)·(±1) + (±1/4). Every codeword
entry is a multiple of 1/4 below 3, exact in bf16 and fp16, so decoded tiles feed the tensor cores
without rounding; the single per-matrix scale (read on the device, no host sync) multiplies the
float32 result.

* ``gemv``: one token, CUDA cores, one program per BLOCK_N rows over all of K, the tensors [codes,
  rows] with the code columns visited in a permuted order, so a thread holds one code column for all
  its rows (7.3 instructions per weight in its loop, bench/sass_count.py; 1.44-1.79x bf16 on the H100
  at Llama-3-8B shapes, session 20).
* ``matmul_small``: M <= 64, the [rows, 8·codes] tile decoded by one 16-byte gather per code from the
  whole codebook in the tile's half type ((65536, 8), 1 MiB per type and device, L2-resident; 2.5
  instructions per weight against 27.6 for decoding by arithmetic), the A operand of tl.dot, split-K.
* ``dequant_matmul``: prefill; decode the whole weight to bf16/fp16 by arithmetic, then cuBLAS.

Which one runs for how many tokens is declared with the E8P format (rsq/formats/e8p.py).

Codes may be int16 (the checkpoint's bit pattern) or int32 (values 0..65535).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from rsq.kernels.triton_wq import _row_block, _sm_count


def _table(device: str, field_bits: int, encode, parity_bit: int) -> torch.Tensor:
    """(256,) int32, one word per abs pattern: encode(2a_j) in bits field_bits·j.. and the parity
    of sum(a) in bit parity_bit."""
    from rsq.quant.e8p import _abs_patterns_int

    rows = []
    for twice in _abs_patterns_int():  # entries 2a in {1, 3, 5}
        word = sum(encode(t) << (field_bits * j) for j, t in enumerate(twice))
        rows.append(word | (((sum(twice) // 2) % 2) << parity_bit))
    return torch.tensor(rows, dtype=torch.int32, device=device)


@functools.lru_cache(maxsize=8)
def device_tables(device: str) -> tuple[torch.Tensor, torch.Tensor, dict[torch.dtype, torch.Tensor]]:
    """(pattern_table, gemv_table, {bf16, fp16: the codebook}) of ``device``, built together at the
    first call of any E8P kernel there. Built one by one, the one-token GEMV's table would first be
    needed at the first decode step, after a prefill that used only the tiles' table: inside a
    compiled step's CUDA-graph-tree warm-up, whose private memory pool would then hold the cached
    table, untracked, and the step fails ("tensor(s) in the cudagraph pool not tracked as outputs")."""
    from rsq.quant.e8p import e8p_codebook

    pattern = _table(device, 2, lambda t: (t - 1) // 2, 16)
    book = e8p_codebook(device)  # (65536, 8) float32; every entry exact in both half types
    books = {dtype: book.to(dtype).contiguous() for dtype in (torch.bfloat16, torch.float16)}
    return pattern, _table(device, 3, lambda t: t, 24), books


def pattern_table(device: str) -> torch.Tensor:
    """For _decode: v_j = a_j - 1/2 in bits 2j..2j+1, parity of sum(a) in bit 16."""
    return device_tables(device)[0]


def gemv_table(device: str) -> torch.Tensor:
    """For the GEMV: 2a_j in bits 3j..3j+2 (< 2^23, so a masked field read as float32 is the
    subnormal 2a_j·2^(3j-149)), parity of sum(a) in bit 24."""
    return device_tables(device)[1]


def codebook_table(device: str, dtype: torch.dtype) -> torch.Tensor:
    """For the tiles: the whole codebook, (65536, 8) in ``dtype`` (bf16 or fp16; 1 MiB, L2-resident),
    row = 16-bit code: one 16-byte gather decodes 8 weights exactly."""
    return device_tables(device)[2][dtype]


@triton.jit
def _pattern_and_signs(c, tab_ptr, PARITY_BIT: tl.constexpr):
    """(16-bit code, its table word, its 8 sign bits) for [R, C] int codes: the 7 stored sign bits
    plus coordinate 7's, which makes the parity of the negative entries equal sum(a) mod 2."""
    c = c & 0xFFFF
    p = tl.load(tab_ptr + (c >> 8))
    s = c & 0x7F
    t = s ^ (s >> 4)
    t = t ^ (t >> 2)
    t = t ^ (t >> 1)
    return c, p, s | (((t ^ (p >> PARITY_BIT)) & 1) << 7)


@triton.jit
def _decode(c, tab_ptr):
    """[R, C] int codes -> [R, C, 8] float32 codewords."""
    c, p, neg = _pattern_and_signs(c, tab_ptr, 16)
    j = tl.arange(0, 8)
    v = ((p[:, :, None] >> (2 * j[None, None, :])) & 3).to(tl.float32) + 0.5
    sign = 1.0 - 2.0 * ((neg[:, :, None] >> j[None, None, :]) & 1).to(tl.float32)
    shift = tl.where(((c >> 7) & 1) == 1, 0.25, -0.25)
    return v * sign + shift[:, :, None]


@triton.jit
def _gather(codes, book_ptr):
    """[R, C] int codes -> [R, 8C] decoded weights: one 16-byte gather per code from the (65536, 8)
    codebook in the tile's half type, no arithmetic."""
    j = tl.arange(0, 8)
    w = tl.load(book_ptr + (codes & 0xFFFF)[:, :, None] * 8 + j[None, None, :])
    return tl.reshape(w, (codes.shape[0], codes.shape[1] * 8))


@triton.jit
def _signed_term(xj, neg, p, J: tl.constexpr):
    """Weight J of each code times its activation, in units of 2^-64: the 3-bit field 2a_J of the
    pattern word read as the float32 subnormal 2a_J·2^(3J-149), times xj·2^(85-3J) with its sign bit
    flipped where the weight is negative (``xj`` broadcasts against ``neg`` and ``p``)."""
    xs = (xj * (2.0 ** (85 - 3 * J))).to(tl.int32, bitcast=True)
    sx = (xs ^ ((neg << (31 - J)) & -2147483648)).to(tl.float32, bitcast=True)
    return (p & (7 << (3 * J))).to(tl.float32, bitcast=True) * sx


@triton.jit
def _gemv_store(total, s_ptr, b_ptr, y_ptr, rows, row_mask, HAS_BIAS: tl.constexpr):
    """y = 2^63 · scale · total (+ bias) for the program's rows."""
    out = total * (2.0**63) * tl.load(s_ptr).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(b_ptr + rows).to(tl.float32)
    tl.store(y_ptr + rows, out.to(y_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _gemv_kernel(
    x_ptr,
    c_ptr,
    tab_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    N,
    K,
    C,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """One token. Per weight: one LOP3 (the 3-bit field 2a_j of the pattern word, read as a float32
    subnormal 2a_j·2^(3j-149)), the sign applied to x by an xor of its sign bit, one FFMA with
    x_j·2^(85-3j); the ±1/4 shift enters once per code through the code's column sum of x. The
    tensors are [codes, rows] with the code columns visited in a permuted order (no contiguous runs,
    so Triton does not vectorize the loads along C): a thread holds one code column for all BLOCK_N
    rows, each activation is loaded, scaled and summed once for them, and the loop needs no
    shared-memory layout exchanges (7.3 instructions per weight, against 10.1 for [rows, codes] with
    vectorized code loads, the kernel before session 20: 1.28-1.54x bf16 where this one is 1.44-1.79x)."""
    rows, row_mask = _row_block(N, BLOCK_N)
    cc = tl.arange(0, BLOCK_C)
    cc = (cc % 8) * (BLOCK_C // 8) + cc // 8  # a permutation of the tile's columns
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        col = c0 + cc
        cmask = col < C
        c = tl.load(c_ptr + rows[None, :] * C + col[:, None], mask=cmask[:, None], other=0).to(tl.int32)
        c, p, neg = _pattern_and_signs(c, tab_ptr, 24)
        xsum = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_ptr + col * 8 + j, mask=cmask, other=0.0).to(tl.float32)
            xsum += xj
            acc += _signed_term(xj[:, None], neg, p, j)
        xs8 = (xsum * (2.0**-65))[:, None]
        acc += tl.where((c & 0x80) != 0, xs8, -xs8)
    _gemv_store(tl.sum(acc, axis=0), s_ptr, b_ptr, y_ptr, rows, row_mask, HAS_BIAS)


@triton.jit
def _small_kernel(
    x_ptr,
    c_ptr,
    tab_ptr,
    s_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    C,
    stride_xm,
    stride_ym,
    SPLIT_K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ATOMIC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    BLOCK_K: tl.constexpr = BLOCK_C * 8
    rows, row_mask = _row_block(N, BLOCK_N)
    ms = tl.arange(0, BLOCK_M)
    cc = tl.arange(0, BLOCK_C)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for c0 in range(tl.program_id(1) * BLOCK_C, C, SPLIT_K * BLOCK_C):
        cmask = (c0 + cc) < C
        codes = tl.load(c_ptr + rows[:, None] * C + (c0 + cc)[None, :], mask=cmask[None, :], other=0).to(tl.int32)
        w = _gather(codes, tab_ptr).to(x_ptr.dtype.element_ty)
        cols = c0 * 8 + kk
        xt = tl.load(
            x_ptr + ms[None, :] * stride_xm + cols[:, None], mask=(cols < K)[:, None] & (ms < M)[None, :], other=0.0
        )  # [BLOCK_K, BLOCK_M]
        acc = tl.dot(w, xt, acc)
    out = acc * tl.load(s_ptr).to(tl.float32)
    if HAS_BIAS:
        out += tl.where(tl.program_id(1) == 0, tl.load(b_ptr + rows).to(tl.float32), 0.0)[:, None]
    ptrs = y_ptr + ms[None, :] * stride_ym + rows[:, None]
    mask = row_mask[:, None] & (ms < M)[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, out, mask=mask)
    else:
        tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(c_ptr, tab_ptr, s_ptr, w_ptr, N, K, C, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < N)[:, None] & (cc < C)[None, :]
    codes = tl.load(c_ptr + rows[:, None] * C + cc[None, :], mask=mask, other=0).to(tl.int32)
    w = tl.reshape(_decode(codes, tab_ptr) * tl.load(s_ptr).to(tl.float32), (BLOCK_N, BLOCK_C * 8))
    cols = tl.program_id(1) * BLOCK_C * 8 + tl.arange(0, BLOCK_C * 8)
    tl.store(
        w_ptr + rows[:, None] * K + cols[None, :],
        w.to(w_ptr.dtype.element_ty),
        mask=(rows < N)[:, None] & (cols < K)[None, :],
    )


# ---------------------------------------------------------------------------------------------- host


def _check(x, codes):
    n, c = codes.shape
    if x.shape[-1] != 8 * c:
        raise ValueError(f"x has {x.shape[-1]} features, the E8P codes cover {8 * c}")
    return x.shape[0], n, 8 * c, c


def gemv_config(n: int, sms: int = 132) -> dict:
    """From sweeps on the H100 (bench/NOTES-kernels.md): 128 codes (1024 columns) per step, 4 warps,
    16 rows unless that leaves < 2 programs per SM."""
    block_n = 16
    while block_n > 1 and triton.cdiv(n, block_n) < 2 * sms:
        block_n //= 2
    return dict(BLOCK_N=block_n, BLOCK_C=128, num_warps=4)


def gemv(x, codes, scales, bias=None, *, config: dict | None = None):
    """y (1, N) = x (1, 8C) @ W_hat^T + bias for one token (CUDA cores). |x| < 2^42."""
    m, n, k, c = _check(x, codes)
    if m != 1:
        raise ValueError(f"the E8P gemv takes one token; got {m}: use matmul_small")
    cfg = config or gemv_config(n, _sm_count(x.device))
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x,
        codes,
        gemv_table(str(x.device)),
        scales,
        bias if bias is not None else y,
        y,
        n,
        k,
        c,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_C=cfg["BLOCK_C"],
        HAS_BIAS=bias is not None,
        num_warps=cfg["num_warps"],
    )
    return y


def small_config(m: int, n: int, c: int, sms: int = 132) -> dict:
    """Default configuration of :func:`matmul_small`: 64 rows x 16 codes, 4 warps, 2 stages (the
    best of four tilings on the H100, session 20), split K until ~2 programs per SM."""
    block_n, block_c = 64, 16
    split = max(1, min(triton.cdiv(2 * sms, triton.cdiv(n, block_n)), triton.cdiv(c, block_c), 16))
    return dict(
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n,
        BLOCK_C=block_c,
        SPLIT_K=split,
        num_warps=4,
        num_stages=2,
    )


def matmul_small(x, codes, scales, bias=None, *, config: dict | None = None):
    """M <= 64 tokens: weight tiles decoded by codebook gathers x tensor cores, split-K with float32
    atomics. bf16 or fp16 activations (the codebook is kept in those two types)."""
    m, n, k, c = _check(x, codes)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the E8P tiles take bf16 or fp16 activations, got {x.dtype}")
    cfg = config or small_config(m, n, c, _sm_count(x.device))
    split = cfg["SPLIT_K"]
    y = (torch.zeros if split > 1 else torch.empty)(
        m, n, device=x.device, dtype=torch.float32 if split > 1 else x.dtype
    )
    _small_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
        x,
        codes,
        codebook_table(str(x.device), x.dtype),
        scales,
        bias if bias is not None else y,
        y,
        m,
        n,
        k,
        c,
        x.stride(0),
        y.stride(0),
        split,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_C=cfg["BLOCK_C"],
        ATOMIC=split > 1,
        HAS_BIAS=bias is not None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return y.to(x.dtype) if split > 1 else y


def dequantize(codes, scales, dtype=torch.bfloat16) -> torch.Tensor:
    """W_hat (N, 8C) in ``dtype``: codeword * scale computed in float32, then rounded."""
    n, c = codes.shape
    w = torch.empty(n, 8 * c, device=codes.device, dtype=dtype)
    block_n, block_c = 16, 32
    _dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(c, block_c))](
        codes, pattern_table(str(codes.device)), scales, w, n, 8 * c, c, BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4
    )
    return w


def dequant_matmul(x, codes, scales, bias=None):
    """Prefill: decode the whole weight (transient N x K buffer), then cuBLAS."""
    w = dequantize(codes, scales, x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
