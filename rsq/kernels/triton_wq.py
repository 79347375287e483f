"""Triton kernels: packed 2/3/4/8-bit weights x bf16/fp16 activations, dequantized in registers.

Weights use the dense layout of rsq/quant/pack.py: row n of ``qweight`` (int32, KW words) holds the
codes of W[n, :] in runs of 32 codes = ``bits`` words. A tile of BLOCK_K columns (a multiple of 32,
starting at a run boundary) is read as "virtual words" of CPV codes each: real words for 2/4/8 bits
(16-bit halves for 2 bits in the GEMV); for 3 bits a 96-bit run is read as four 24-bit virtual
words of 8 codes, (w[lo] >> sh) | (w[hi] << hs) with lo = 3v // 4, sh = 24v mod 32 (the tensor-core
tiles load the run's three words with three strided loads and join them with constant shifts:
``_tile_codes``).

Codes never go through int->float conversion instructions:
* GEMV: the bits code << pos (pos + bits <= 24) read as float32 are exactly code * 2^(pos - 149);
  one LOP3 per code, and the product with x * 2^(85 - pos) is code * x * 2^-64.
* tensor-core tiles: (0x4B000000 | q) read as float32 is 2^23 + q; 16-bit tiles are built directly
  as bf16 0x4300 | q = 128 + q (fp16 0x6400 | q = 1024 + q), exact, offset removed after the dot.

Kernels (host wrappers below; registered with their capabilities in rsq/kernels/__init__.py;
measurements in bench/NOTES-kernels.md):
* ``gemv``: M <= 4 tokens, CUDA cores, one program per BLOCK_N rows over the whole K range with the
  next tile's words and x prefetched into registers; one reduction at the end.
* ``matmul_small``: M <= 64, wgmma with the weight tile as the A operand (tokens are the MMA's N),
  zero/scale applied to the product; split-K with float32 atomics.
* ``dequant_matmul``: prefill, dequantize the whole weight with ``dequantize`` then cuBLAS.
* ``matmul_large``: prefill GEMM fed by tiles dequantized in registers (slower than dequant_matmul
  on H100; kept as the fused path and tested).

Constraints (the dispatcher's declarations): group_size -1 or a multiple of 32; any N and K (K is
padded to the packed width and masked). GEMV: |x| < 2^43.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

_TWO23 = tl.constexpr(8388608.0)  # 2^23: float32 ulp is 1 on [2^23, 2^24)


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _row_block(N, BLOCK_N: tl.constexpr):
    """The program's BLOCK_N rows (those past N clamped to row 0, so loads stay in bounds) and their
    mask."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    return tl.where(row_mask, rows, 0), row_mask


@triton.jit
def _load_words(qw_ptr, rows, row_mask, KW, k0, BITS: tl.constexpr, NV: tl.constexpr):
    """Words for columns [k0, k0 + BLOCK_K) of ``rows``: (lo, hi), each [BLOCK_N, NV] int32.

    bits 2/4/8: NV consecutive words from word k0 * bits / 32; hi is lo.
    bits 3: lo/hi words of NV virtual 24-bit words (see module docstring).
    """
    row_off = rows[:, None] * KW
    if BITS == 3:
        vi = tl.arange(0, NV)
        v = vi % 4
        base = (k0 // 32) * 3 + (vi // 4) * 3
        lo_idx = base + (3 * v) // 4
        hi_idx = tl.minimum(lo_idx + 1, base + 2)
        mask = row_mask[:, None] & (lo_idx < KW)[None, :]
        lo = tl.load(qw_ptr + row_off + lo_idx[None, :], mask=mask, other=0)
        hi = tl.load(qw_ptr + row_off + hi_idx[None, :], mask=mask, other=0)
    else:
        idx = (k0 * BITS) // 32 + tl.arange(0, NV)
        mask = row_mask[:, None] & (idx < KW)[None, :]
        lo = tl.load(qw_ptr + row_off + idx[None, :], mask=mask, other=0)
        hi = lo
    return lo, hi


@triton.jit
def _unpack_codes(lo, hi, BITS: tl.constexpr, NV: tl.constexpr, CPV: tl.constexpr):
    """[BLOCK_N, NV] words -> [BLOCK_N, NV, CPV] uint32 codes (column v*CPV + j)."""
    word = lo.to(tl.uint32, bitcast=True)
    if BITS == 3:
        sh = ((tl.arange(0, NV) % 4) * 24) % 32
        hs = tl.where(sh == 0, 24, 32 - sh)
        word = (word >> sh.to(tl.uint32)[None, :]) | (hi.to(tl.uint32, bitcast=True) << hs.to(tl.uint32)[None, :])
    shifts = (tl.arange(0, CPV) * BITS).to(tl.uint32)
    return (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)


@triton.jit
def _unpack_float(lo, hi, magic, BITS: tl.constexpr, NV: tl.constexpr, CPV: tl.constexpr):
    """[BLOCK_N, NV] words -> [BLOCK_N, NV, CPV] float32 holding 2^23 + code (column v*CPV + j).

    ``magic`` is 0x4B000000 passed as a run-time argument: ptxas then keeps it in a register and
    fuses (code & mask) | magic into one LOP3 (with a literal it emits two)."""
    return (_unpack_codes(lo, hi, BITS, NV, CPV) | magic).to(tl.float32, bitcast=True)


@triton.jit
def _tile_codes(qw_ptr, rows, row_mask, KW, k0, BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K] uint32 codes of columns [k0, k0 + BLOCK_K) of ``rows`` (tensor-core tiles).

    3 bits: the three words (w0, w1, w2) of each 32-code run are three strided [BLOCK_N, runs] loads,
    joined into the run's four 24-bit virtual words with constant shifts: v0 = w0,
    v1 = w0 >> 24 | w1 << 8, v2 = w1 >> 16 | w2 << 16, v3 = w2 >> 8 (code 8i + j = v_i >> 3j & 7).
    No gathered loads and no per-column shift amounts (the _load_words path for 3 bits has both and
    ran 4x slower than 4 bits at M = 16). Other widths: _load_words + _unpack_codes."""
    if BITS == 3:
        R: tl.constexpr = BLOCK_K // 32
        base = (k0 // 32) * 3 + tl.arange(0, R) * 3
        mask = row_mask[:, None] & (base < KW)[None, :]
        ptr = qw_ptr + rows[:, None] * KW + base[None, :]
        w0 = tl.load(ptr, mask=mask, other=0).to(tl.uint32, bitcast=True)
        w1 = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint32, bitcast=True)
        w2 = tl.load(ptr + 2, mask=mask, other=0).to(tl.uint32, bitcast=True)
        # join(join(a, c), join(b, d))[..., i, j] is (a, b, c, d)[2i + j]
        v = tl.join(tl.join(w0, (w1 >> 16) | (w2 << 16)), tl.join((w0 >> 24) | (w1 << 8), w2 >> 8))
        v = tl.reshape(v, (BLOCK_N, BLOCK_K // 8))
        shifts = (tl.arange(0, 8) * 3).to(tl.uint32)
        codes = (v[:, :, None] >> shifts[None, None, :]) & 7
    else:
        CPV: tl.constexpr = 32 // BITS
        NV: tl.constexpr = BLOCK_K // CPV
        lo, hi = _load_words(qw_ptr, rows, row_mask, KW, k0, BITS, NV)
        codes = _unpack_codes(lo, hi, BITS, NV, CPV)
    return tl.reshape(codes, (BLOCK_N, BLOCK_K))


# ---------------------------------------------------------------------------------------------
# M = 1: CUDA-core GEMV


@triton.jit
def _gemv_words(qw_ptr, rows, row_mask, KW, k0, BITS: tl.constexpr, NV: tl.constexpr):
    """[NV, BLOCK_N, 1, 1] words (lo, hi) of columns [k0, k0 + NV * CPV) (word-major: see _gemv_kernel)."""
    vi = tl.arange(0, NV)
    row_off = rows[None, :, None, None] * KW
    if BITS == 3:
        v = vi % 4
        base = (k0 // 32) * 3 + (vi // 4) * 3
        lo_idx = base + (3 * v) // 4
        hi_idx = tl.minimum(lo_idx + 1, base + 2)
        mask = row_mask[None, :, None, None] & (lo_idx < KW)[:, None, None, None]
        lo = tl.load(qw_ptr + row_off + lo_idx[:, None, None, None], mask=mask, other=0)
        hi = tl.load(qw_ptr + row_off + hi_idx[:, None, None, None], mask=mask, other=0)
    else:
        if BITS == 2:  # virtual word v = 16-bit half v % 2 of word v // 2 (8 codes, like 3 and 4 bits)
            idx = (k0 * BITS) // 32 + vi // 2
        else:
            idx = (k0 * BITS) // 32 + vi
        mask = row_mask[None, :, None, None] & (idx < KW)[:, None, None, None]
        lo = tl.load(qw_ptr + row_off + idx[:, None, None, None], mask=mask, other=0)
        hi = lo
    return lo, hi


@triton.jit
def _gemv_unit(lo, hi, BITS: tl.constexpr, NV: tl.constexpr, CPV: tl.constexpr):
    """[NV, BLOCK_N, 1, 1] words -> (f [NV, BLOCK_N, 1, CPV] float32, pos [CPV] int32).

    f's bit pattern is code_j << pos_j with pos_j + BITS <= 24, so as a float f = code * 2^(pos - 149)
    exactly (a subnormal, or a normal with exponent field 1, both linear in the bits): one LOP3 per
    code and no int->float conversion. Codes in bits 24..31 are read from word >> 8 (one shift per
    word). The kernel multiplies by x * 2^(85 - pos), so every product is code * x * 2^-64.
    Needs FMAs that keep subnormals (Triton emits fma.rn.f32, not .ftz).
    """
    word = lo.to(tl.uint32, bitcast=True)
    j = tl.arange(0, CPV)
    if BITS == 3:
        sh = ((tl.arange(0, NV) % 4) * 24) % 32
        hs = tl.where(sh == 0, 24, 32 - sh)
        word = (word >> sh.to(tl.uint32)[:, None, None, None]) | (
            hi.to(tl.uint32, bitcast=True) << hs.to(tl.uint32)[:, None, None, None]
        )
        pos = j * 3
        src = word
    elif BITS == 2:
        pos = j * 2
        src = word >> ((tl.arange(0, NV) % 2) * 16).to(tl.uint32)[:, None, None, None]
    else:
        low = j < 24 // BITS
        pos = tl.where(low, j * BITS, j * BITS - 8)
        src = tl.where(low[None, None, None, :], word, word >> 8)
    bits = src & (((1 << BITS) - 1) << pos).to(tl.uint32)[None, None, None, :]
    return bits.to(tl.float32, bitcast=True), pos


@triton.jit
def _gemv_add_groups(acc, t, xs, s_ptr, z_ptr, rows, NG, GS: tl.constexpr, start):
    """acc += s_g (t - z_g xs 2^-64) for partial sums t [L, BLOCK_N, BLOCK_M] (units of 2^-64) over
    column slices that each lie in one group; ``start`` [L]: each slice's first column."""
    g = tl.minimum(start // GS, NG - 1)[:, None, None]
    zg = tl.load(z_ptr + rows[None, :, None] * NG + g).to(tl.float32)  # [L, BLOCK_N, 1]
    sg = tl.load(s_ptr + rows[None, :, None] * NG + g).to(tl.float32)
    return acc + sg * (t - zg * (xs * 5.421010862427522e-20))  # xs * 2^-64


@triton.jit
def _gemv_epilogue(
    acc, accx, s_ptr, z_ptr, b_ptr, y_ptr, rows, row_mask, tok, M, stride_ym, PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """y = 2^64 sum over acc's first axis, per channel s (y - z sum x), + bias, stored [M, BLOCK_N]."""
    y = tl.sum(acc, axis=0) * 1.8446744073709552e19  # [BLOCK_N, BLOCK_M], * 2^64
    if PER_CHANNEL:
        z = tl.load(z_ptr + rows).to(tl.float32)[:, None]
        s = tl.load(s_ptr + rows).to(tl.float32)[:, None]
        y = s * (y - z * tl.sum(accx, axis=0))
    if HAS_BIAS:
        y += tl.load(b_ptr + rows).to(tl.float32)[:, None]
    tl.store(
        y_ptr + tok[None, :] * stride_ym + rows[:, None],
        y.to(y_ptr.dtype.element_ty),
        mask=row_mask[:, None] & (tok < M)[None, :],
    )


@triton.jit(do_not_specialize=["KW"])
def _gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    KW,
    NG,
    stride_xm,
    stride_ym,
    BITS: tl.constexpr,
    CPV: tl.constexpr,
    GS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """y[m, n] = sum_k s (q - z) x[m, k]  =  s (2^64 sum_k f_k X[m, k] - z sum_k x[m, k]),
    X = x 2^(85 - pos), for M <= BLOCK_M tokens (BLOCK_M small: every code costs BLOCK_M FMAs).

    Tensors are word-major, [NV, BLOCK_N, BLOCK_M, CPV]: with KW unspecialized, Triton cannot prove
    rows 16-byte aligned, so each thread loads single words (4-byte loads, coalesced along NV), and
    loads whose addresses are not contiguous (zeros, scales) also get threads along dim 0 (Triton's
    tie order): one thread layout for every tensor, no shared-memory conversions. A thread holds a
    word of all BLOCK_N rows, so x (loaded [NV, 1, BLOCK_M, CPV], 16-byte vectors) is converted and
    scaled once for all rows. Per tile, t[v, n, m] = sum_j f X (in-thread FMAs), xs[v, m] = sum_j x;
    per channel both are accumulated and combined at the end, grouped ones per word with that
    word's scale and zero. |x| must stay below 2^43 (X finite)."""
    NV: tl.constexpr = BLOCK_K // CPV
    rows, row_mask = _row_block(N, BLOCK_N)
    vi = tl.arange(0, NV)
    tok = tl.arange(0, BLOCK_M)
    cols = vi[:, None, None, None] * CPV + tl.arange(0, CPV)[None, None, None, :]  # [NV, 1, 1, CPV]
    x_off = tok[None, None, :, None] * stride_xm  # [1, 1, BLOCK_M, 1]
    x_mask = (tok < M)[None, None, :, None]
    acc = tl.zeros([NV, BLOCK_N, BLOCK_M], dtype=tl.float32)
    accx = tl.zeros([NV, 1, BLOCK_M], dtype=tl.float32)
    lo, hi = _gemv_words(qw_ptr, rows, row_mask, KW, 0, BITS, NV)
    xn = tl.load(x_ptr + x_off + cols, mask=x_mask & (cols < K), other=0.0)
    for k0 in range(0, K, BLOCK_K):
        # prefetch the next tile's words and x: the loop then waits on no load it issued itself
        nlo, nhi = _gemv_words(qw_ptr, rows, row_mask, KW, k0 + BLOCK_K, BITS, NV)
        kn = k0 + BLOCK_K + cols
        nxn = tl.load(x_ptr + x_off + kn, mask=x_mask & (kn < K), other=0.0)
        f, pos = _gemv_unit(lo, hi, BITS, NV, CPV)  # [NV, BLOCK_N, 1, CPV]
        mult = ((85 - pos + 127) << 23).to(tl.float32, bitcast=True)  # 2^(85 - pos), exact
        xv = xn.to(tl.float32)
        t = tl.sum(f * (xv * mult[None, None, None, :]), axis=3)  # [NV, BLOCK_N, BLOCK_M], units of 2^-64
        xs = tl.sum(xv, axis=3)  # [NV, 1, BLOCK_M]
        if PER_CHANNEL:
            acc += t
            accx += xs
        else:  # one group per word (GS >= 32 >= CPV)
            acc = _gemv_add_groups(acc, t, xs, s_ptr, z_ptr, rows, NG, GS, k0 + vi * CPV)
        lo = nlo
        hi = nhi
        xn = nxn
    _gemv_epilogue(acc, accx, s_ptr, z_ptr, b_ptr, y_ptr, rows, row_mask, tok, M, stride_ym, PER_CHANNEL, HAS_BIAS)


# ---------------------------------------------------------------------------------------------
# tensor-core tile kernel (small M with split-K, and prefill)


@triton.jit(do_not_specialize=["magic"])
def _dot_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    KW,
    NG,
    GS,
    stride_xm,
    stride_ym,
    SPLIT_K,
    magic,
    BITS: tl.constexpr,
    CPV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    ATOMIC: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """y[M, N] (+)= x[M, K] @ W_hat[N, K]^T with 128-token tiles (prefill). GS % BLOCK_K == 0 (or per
    channel), so a K tile lies in one group: grouped tiles are scaled before the dot; per channel the
    dot takes exact (q - z) and the product is scaled once. ATOMIC: split-K, float32 atomics."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n  # programs per group of GROUP_M row-blocks (L2 reuse of weight tiles)
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = m < M
    row_mask = rows < N
    rows = tl.where(row_mask, rows, 0)
    kt = tl.arange(0, BLOCK_K)

    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = tl.program_id(1) * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    zf = tl.load(z_ptr + rows * NG).to(tl.float32) + _TWO23
    for t in range(t0, t1):
        k0 = t * BLOCK_K
        xk = tl.load(
            x_ptr + m[:, None] * stride_xm + (k0 + kt)[None, :],
            mask=m_mask[:, None] & ((k0 + kt) < K)[None, :],
            other=0.0,
        )
        f = (_tile_codes(qw_ptr, rows, row_mask, KW, k0, BITS, BLOCK_N, BLOCK_K) | magic).to(tl.float32, bitcast=True)
        if PER_CHANNEL:
            w = f - zf[:, None]
        else:
            g = k0 // GS
            w = f - (tl.load(z_ptr + rows * NG + g).to(tl.float32) + _TWO23)[:, None]
            w = w * tl.load(s_ptr + rows * NG + g).to(tl.float32)[:, None]
        w = w.to(x_ptr.dtype.element_ty)
        acc += tl.dot(xk, tl.trans(w))
    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + rows * NG).to(tl.float32)[None, :]
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            acc += tl.load(b_ptr + rows).to(tl.float32)[None, :]
    out = y_ptr + m[:, None] * stride_ym + rows[None, :]
    mask = m_mask[:, None] & row_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["magic"])
def _small_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    b_ptr,
    y_ptr,
    M,
    N,
    K,
    KW,
    NG,
    GS,
    stride_xm,
    stride_ym,
    SPLIT_K,
    magic,
    BITS: tl.constexpr,
    CPV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE16: tl.constexpr,
    OFFSET: tl.constexpr,
):
    """y^T[N, M] (+)= W_hat[N, K] @ x^T[K, M] for few tokens: the weight tile is the MMA's A operand
    (BLOCK_N rows = the MMA's M dimension, no transpose of the dequantized tile), the tokens its N
    dimension (BLOCK_M >= 16).

    The tile holds OFFSET + q exactly: USE16 builds the 16-bit pattern magic | q directly (bf16
    0x4300 | q = 128 + q for q < 128; fp16 0x6400 | q = 1024 + q), else 2^23 + q - 2^23 in float32.
    Zero and scale are applied to the [BLOCK_N, BLOCK_M] product with the tile's column sums of x:
    sum_k (q - z) x = dot - (OFFSET + z) sum_k x. GS % BLOCK_K == 0 (or per channel).
    ATOMIC: split-K, float32 atomics into a zeroed y."""
    rows, row_mask = _row_block(N, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    m_mask = m < M
    kt = tl.arange(0, BLOCK_K)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    t0 = tl.program_id(1) * per_split
    t1 = tl.minimum(t0 + per_split, k_tiles)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    xsum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t in range(t0, t1):
        k0 = t * BLOCK_K
        xk = tl.load(
            x_ptr + m[None, :] * stride_xm + (k0 + kt)[:, None],
            mask=m_mask[None, :] & ((k0 + kt) < K)[:, None],
            other=0.0,
        )  # [BLOCK_K, BLOCK_M]
        codes = _tile_codes(qw_ptr, rows, row_mask, KW, k0, BITS, BLOCK_N, BLOCK_K)
        if USE16:
            w = (codes | magic).to(tl.int16).to(x_ptr.dtype.element_ty, bitcast=True)
        else:
            w = ((codes | magic).to(tl.float32, bitcast=True) - _TWO23).to(x_ptr.dtype.element_ty)
        part = tl.dot(w, xk)
        if PER_CHANNEL:
            acc += part
            xsum += tl.sum(xk.to(tl.float32), axis=0)
        else:
            g = k0 // GS
            zg = tl.load(z_ptr + rows * NG + g).to(tl.float32) + OFFSET
            sg = tl.load(s_ptr + rows * NG + g).to(tl.float32)
            xs = tl.sum(xk.to(tl.float32), axis=0)
            acc += sg[:, None] * (part - zg[:, None] * xs[None, :])
    if PER_CHANNEL:
        z = tl.load(z_ptr + rows).to(tl.float32) + OFFSET
        acc = tl.load(s_ptr + rows).to(tl.float32)[:, None] * (acc - z[:, None] * xsum[None, :])
    if HAS_BIAS:
        if tl.program_id(1) == 0:
            acc += tl.load(b_ptr + rows).to(tl.float32)[:, None]
    out = y_ptr + m[None, :] * stride_ym + rows[:, None]
    mask = m_mask[None, :] & row_mask[:, None]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask, sem="relaxed")
    else:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# whole-weight dequantization


@triton.jit(do_not_specialize=["magic"])
def _dequant_kernel(
    qw_ptr,
    s_ptr,
    z_ptr,
    w_ptr,
    N,
    K,
    KW,
    NG,
    GS,
    magic,
    BITS: tl.constexpr,
    CPV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
):
    rows, row_mask = _row_block(N, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    f = (_tile_codes(qw_ptr, rows, row_mask, KW, k0, BITS, BLOCK_N, BLOCK_K) | magic).to(tl.float32, bitcast=True)
    g = 0 if PER_CHANNEL else k0 // GS
    zf = tl.load(z_ptr + rows * NG + g).to(tl.float32) + _TWO23
    sg = tl.load(s_ptr + rows * NG + g).to(tl.float32)
    w = (f - zf[:, None]) * sg[:, None]
    cols = k0 + tl.arange(0, BLOCK_K)
    tl.store(
        w_ptr + rows[:, None] * K + cols[None, :],
        w.to(w_ptr.dtype.element_ty),
        mask=row_mask[:, None] & (cols < K)[None, :],
    )


# ---------------------------------------------------------------------------------------------
# host side

_MAGIC = 0x4B000000  # float32 bits of 2^23


def _cpv(bits: int) -> int:
    """Codes per (virtual) word of _load_words/_unpack_float: a 24-bit virtual word for 3 bits."""
    return 8 if bits == 3 else 32 // bits


def _gemv_cpv(bits: int) -> int:
    """Codes per (virtual) word of the GEMV kernel: 8 (16-bit halves for 2 bits), 4 bytes for 8."""
    return 4 if bits == 8 else 8


def _pow2_block(group_size: int, cap: int) -> int:
    """Largest power of two <= cap dividing group_size (>= 32, as group_size is a multiple of 32)."""
    if group_size == -1:
        return cap
    b = 32
    while b * 2 <= cap and group_size % (b * 2) == 0:
        b *= 2
    return b


def _shape(x, qweight, scales, in_features, group_size):
    n, kw = qweight.shape
    return x.shape[0], n, in_features, kw, scales.shape[1], (in_features if group_size == -1 else group_size)


def _sm_count(device) -> int:
    if device.type != "cuda":  # Triton's CPU interpreter (TRITON_INTERPRET=1), used to debug
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemv_config(m: int, n: int, k: int, bits: int, group_size: int, sms: int = 132) -> dict:
    """Default launch configuration of :func:`gemv`, from the sweeps in bench/NOTES-kernels.md:
    8 rows per program, 4 warps; 1024 columns per step, except 2048 for one token where K > 4096 or
    fewer than 2 programs per SM would run (H100, session 20: 1024 is 5-12 % faster at 4096-28672 x
    4096, 2048 at 4096 x 14336 and 1024 x 4096)."""
    block_m = triton.next_power_of_2(m)
    block_k = 2048 if m == 1 and (k > 4096 or triton.cdiv(n, 8) < 2 * sms) else 1024
    block_k = max(32, min(block_k // 2 if bits == 8 else block_k, triton.next_power_of_2(k)))
    block_n = 8 if block_m <= 4 else 4  # BLOCK_M 8 x BLOCK_N 8 spills registers
    while block_n > 1 and triton.cdiv(n, block_n) < 2 * sms:
        block_n //= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)


def gemv(x, qweight, scales, qzeros, bias, *, bits, in_features, group_size, config: dict | None = None):
    """y (M, N) = x (M, K) @ W_hat^T + bias for a few tokens (M <= 8), CUDA-core kernel."""
    m, n, k, kw, ng, gs = _shape(x, qweight, scales, in_features, group_size)
    cfg = config or gemv_config(m, n, k, bits, group_size, _sm_count(x.device))
    if m > cfg["BLOCK_M"]:
        raise ValueError(f"gemv got {m} tokens for BLOCK_M {cfg['BLOCK_M']}: use matmul_small")
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    _gemv_kernel[(triton.cdiv(n, cfg["BLOCK_N"]),)](
        x,
        qweight,
        scales,
        qzeros,
        bias if bias is not None else scales,
        y,
        m,
        n,
        k,
        kw,
        ng,
        x.stride(0),
        y.stride(0),
        BITS=bits,
        CPV=_gemv_cpv(bits),
        GS=gs if group_size != -1 else 0,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        PER_CHANNEL=group_size == -1,
        HAS_BIAS=bias is not None,
        num_warps=cfg["num_warps"],
        num_stages=cfg.get("num_stages", 1),
    )
    return y


def small_config(m: int, n: int, k: int, bits: int, group_size: int, sms: int = 132) -> dict:
    """Default launch configuration of :func:`matmul_small`: split K until ~2 programs per SM."""
    block_n = 64
    block_k = _pow2_block(group_size, 256)
    tiles_n = triton.cdiv(n, block_n)
    split = max(1, min(triton.cdiv(2 * sms, tiles_n), triton.cdiv(k, block_k), 16))
    return dict(
        BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SPLIT_K=split,
        num_warps=4,
        num_stages=3,
    )


def large_config(m: int, n: int, k: int, bits: int, group_size: int, sms: int = 132) -> dict:
    """Default launch configuration of :func:`matmul_large`."""
    return dict(
        BLOCK_M=128, BLOCK_N=128, BLOCK_K=_pow2_block(group_size, 64), SPLIT_K=1, num_warps=8, num_stages=3, GROUP_M=8
    )


def matmul_small(x, qweight, scales, qzeros, bias, *, bits, in_features, group_size, config: dict | None = None):
    """Few tokens (M <= 64): y^T = W_hat x^T with the weight tile as the tensor cores' A operand, split-K."""
    m, n, k, kw, ng, gs = _shape(x, qweight, scales, in_features, group_size)
    cfg = config or small_config(m, n, k, bits, group_size, _sm_count(x.device))
    if group_size != -1 and gs % cfg["BLOCK_K"]:
        raise ValueError(f"BLOCK_K {cfg['BLOCK_K']} must divide group_size {gs}")
    if m > cfg["BLOCK_M"]:
        raise ValueError(f"matmul_small got {m} tokens for BLOCK_M {cfg['BLOCK_M']}")
    split = cfg["SPLIT_K"]
    y = (torch.zeros if split > 1 else torch.empty)(
        m, n, device=x.device, dtype=torch.float32 if split > 1 else x.dtype
    )
    use16 = bits < 8 or x.dtype == torch.float16
    magic = (0x6400 if x.dtype == torch.float16 else 0x4300) if use16 else _MAGIC
    offset = (1024.0 if x.dtype == torch.float16 else 128.0) if use16 else 0.0
    _small_kernel[(triton.cdiv(n, cfg["BLOCK_N"]), split)](
        x,
        qweight,
        scales,
        qzeros,
        bias if bias is not None else scales,
        y,
        m,
        n,
        k,
        kw,
        ng,
        gs,
        x.stride(0),
        y.stride(0),
        split,
        magic,
        BITS=bits,
        CPV=_cpv(bits),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        ATOMIC=split > 1,
        PER_CHANNEL=group_size == -1,
        HAS_BIAS=bias is not None,
        USE16=use16,
        OFFSET=offset,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return y.to(x.dtype) if split > 1 else y


def matmul_large(x, qweight, scales, qzeros, bias, *, bits, in_features, group_size, config: dict | None = None):
    """Prefill GEMM with tiles dequantized in registers fed to tl.dot (fp32 accumulation)."""
    m, n, k, kw, ng, gs = _shape(x, qweight, scales, in_features, group_size)
    cfg = config or large_config(m, n, k, bits, group_size)
    if group_size != -1 and gs % cfg["BLOCK_K"]:
        raise ValueError(f"BLOCK_K {cfg['BLOCK_K']} must divide group_size {gs}")
    split = cfg["SPLIT_K"]
    y = (torch.zeros if split > 1 else torch.empty)(
        m, n, device=x.device, dtype=torch.float32 if split > 1 else x.dtype
    )
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    _dot_kernel[grid](
        x,
        qweight,
        scales,
        qzeros,
        bias if bias is not None else scales,
        y,
        m,
        n,
        k,
        kw,
        ng,
        gs,
        x.stride(0),
        y.stride(0),
        split,
        _MAGIC,
        BITS=bits,
        CPV=_cpv(bits),
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg.get("GROUP_M", 1),
        ATOMIC=split > 1,
        PER_CHANNEL=group_size == -1,
        HAS_BIAS=bias is not None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return y.to(x.dtype) if split > 1 else y


def dequantize(
    qweight, scales, qzeros, *, bits, in_features, group_size, dtype=torch.bfloat16, config: dict | None = None
) -> torch.Tensor:
    """W_hat (N, K) in ``dtype``, computed as float32 (q - z) * s then rounded."""
    n, kw = qweight.shape
    gs = in_features if group_size == -1 else group_size
    cfg = config or dict(BLOCK_N=16, BLOCK_K=_pow2_block(group_size, 256), num_warps=4)
    w = torch.empty(n, in_features, device=qweight.device, dtype=dtype)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(in_features, cfg["BLOCK_K"]))
    _dequant_kernel[grid](
        qweight,
        scales,
        qzeros,
        w,
        n,
        in_features,
        kw,
        scales.shape[1],
        gs,
        _MAGIC,
        BITS=bits,
        CPV=_cpv(bits),
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        PER_CHANNEL=group_size == -1,
        num_warps=cfg["num_warps"],
    )
    return w


def dequant_matmul(x, qweight, scales, qzeros, bias, *, bits, in_features, group_size):
    """Prefill: dequantize the whole weight (transient N x K buffer), then cuBLAS."""
    w = dequantize(qweight, scales, qzeros, bits=bits, in_features=in_features, group_size=group_size, dtype=x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
