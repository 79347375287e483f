"""Uniform integer grids: choose scale/zero, quantize to codes, dequantize. Pure tensor functions.

Codes are always *unsigned* integers in [0, 2^bits - 1] with a per-(row, group) zero point, so one
storage layout serves both grids:

* symmetric: zero = 2^(bits-1), scale = clip * max|w| / (2^(bits-1) - 1); the signed levels are
  {-2^(bits-1), ..., 2^(bits-1) - 1} (spec §1, as QuaRot/GPTQ).
* asymmetric: scale = clip * (max - min) / (2^bits - 1), zero = round(-clip*min / scale).

Dequantized value: w_hat = scale * (code - zero).

Shapes: W is (rows, cols); scale and zero are (rows, n_groups) with n_groups = cols // group_size
(1 for per-channel). ``expand_groups`` broadcasts them to (rows, cols).
"""

from __future__ import annotations

import torch

from rsq.config import GridConfig


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``w`` to unsigned codes. scale/zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = scale * (code - zero), the uniform grid's one formula (scale/zero broadcast)."""
    return scale * (codes - zero)


def dequantize_grouped(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """W_hat (out, in) float32 from codes (out, in) and per-group scale/zero (out, n_groups)."""
    cols = codes.shape[1]
    return dequantize_codes(codes.float(), expand_groups(scale.float(), cols), expand_groups(zero.float(), cols))


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize then dequantize (what GPTQ writes back): dequantize_codes(quantize_codes(...)) op
    for op, computed in place in ``out`` (a buffer of w's shape, reused by the clip search: its
    80 candidates over every weight cost ~2x on CPU with a fresh tensor per op) or a new tensor."""
    out = torch.div(w, scale, out=out)
    return out.round_().add_(zero).clamp_(0, max_code(bits)).sub_(zero).mul_(scale)


def _scale_zero(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool):
    """Scale/zero from per-row ranges (xmin <= 0 <= xmax). Degenerate rows (all zero) get scale 1."""
    if symmetric:
        amax = torch.maximum(xmax, -xmin)
        scale = amax / ((1 << (bits - 1)) - 1)
        scale = torch.where(amax == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        span = xmax - xmin
        scale = span / max_code(bits)
        scale = torch.where(span == 0, torch.ones_like(scale), scale)
        zero = torch.round(-xmin / scale)
    return scale, zero


def find_params(w: torch.Tensor, cfg: GridConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero for ``w`` (rows, cols), all columns forming one group.

    With ``cfg.mse_clip`` the range is shrunk by p in {1, 1 - 1/grid, ..., } (grid*max_shrink
    candidates) and, per row, the p minimising sum |fake_quantize(w) - w|^clip_norm is kept (the
    first such p on ties; spec §1). :func:`clip_search_loop` is that search as a plain torch loop,
    the reference of the Triton kernel that rsq/formats/uniform.py runs instead on CUDA
    (rsq/kernels/triton_scales.py); on the CPU :func:`clip_search_pruned` returns the same scales
    bit for bit, computing the expensive power only for the few candidates a cheap bound cannot rule out.
    Returns scale, zero of shape (rows, 1), float32.
    """
    w = w.float()
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    if cfg.mse_clip:
        search = clip_search_pruned if _prunable(w, cfg.clip_norm) else clip_search_loop
        scale, zero = search(w, xmin, xmax, cfg)
    else:
        scale, zero = _scale_zero(xmin, xmax, cfg.bits, cfg.symmetric)
    return scale[:, None], zero[:, None]


def _candidates(cfg: GridConfig) -> list[float]:
    """The shrink factors p of the clip search, in the order the loop visits them."""
    return [1 - i / cfg.clip_grid for i in range(int(cfg.max_shrink * cfg.clip_grid))]


def clip_search_loop(w: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, cfg: GridConfig):
    """The MSE clip search as one torch pass per candidate: per-row (scale, zero), each (rows,)."""
    scale, zero = _scale_zero(xmin, xmax, cfg.bits, cfg.symmetric)
    best = torch.full_like(xmin, float("inf"))
    buf = torch.empty_like(w)
    for p in _candidates(cfg):
        s1, z1 = _scale_zero(p * xmin, p * xmax, cfg.bits, cfg.symmetric)
        err = fake_quantize(w, s1[:, None], z1[:, None], cfg.bits, out=buf)
        err = err.sub_(w).abs_().pow_(cfg.clip_norm).sum(dim=1)
        better = err < best
        if better.any():
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
            zero = torch.where(better, z1, zero)
    return scale, zero


# --- the pruned search (CPU) ---------------------------------------------------------------------
#
# Why the pruned search returns the loop's scales bit for bit:
#  1. The loop keeps, per row, the first candidate whose error sum err_k is the smallest (strict `<`
#     against a running best; NaN never wins; if no err_k < inf the unshrunk p = 1 parameters stay,
#     which are candidate 0's bit for bit). That is argmin over k with ties to the smallest k, so any
#     order of evaluation that computes err_k exactly for every candidate that could be the minimum
#     gives the same answer.
#  2. err_k is computed with the loop's own ops (fake_quantize into a contiguous buffer, sub, abs,
#     pow, sum over the row). The elementwise ops are exact IEEE operations except pow, whose result
#     differs between ATen's vectorized loop (Sleef, exponent rounded to float32) and its scalar
#     tail (double pow): the search is used only where every element of the loop's pow goes through
#     the vectorized loop (``_pow_all_vectorized``), and its own pow calls are padded with zero rows
#     so that they do too. A row's sum over a contiguous last dimension does not depend on the other
#     rows (ATen's inner sum runs row by row, parallel over rows only).
#  3. A candidate is skipped only if a lower bound of its exact error sum exceeds, with margin for
#     float32 rounding, an exact error sum already computed for the same row: then it cannot be the
#     minimum nor tie with it. The bound is Lyapunov's inequality (Hölder) for the moments
#     S_a = sum |e|^a of the same error values e: with q < b < c, S_b <= S_q^lam * S_c^(1-lam),
#     lam = (c - b) / (c - q), so S_q >= (S_b / S_c^(1-lam))^(1/lam), where b, c are the two
#     half-integers above q (|e|^(n/2) from products and a square root: cheap). On quantization
#     errors it is within ~1% of S_q, leaving ~5 of 80 candidates per row to evaluate exactly.

_GRAIN = 32768  # at::internal::GRAIN_SIZE: ATen splits elementwise work over threads above this many elements
# elements per buffer of the bound pass and per chunk of exact sums (4 MiB): large enough that the
# search makes no more op calls than the loop (each call synchronises the threads: costly on a
# shared, loaded CPU), small enough that memory does not grow with the matrix
_BLOCK = 1 << 20
_VEC_STEP = 32  # elements per step of ATen's vectorized CPU loop: 2 x 16 float32 lanes (AVX-512); AVX2's 16 divides it


def _pow_all_vectorized(numel: int) -> bool:
    """Whether ATen's float32 pow over ``numel`` contiguous elements runs every element through the
    vectorized loop on this thread count: each thread's range (OpenMP split, ATen's parallel_for)
    must be a whole number of vectorized steps, else its tail goes through the scalar path."""
    threads = torch.get_num_threads()
    if numel < _GRAIN or threads == 1:
        return numel % _VEC_STEP == 0
    used = min(threads, -(-numel // _GRAIN))
    chunk = -(-numel // used)
    return all((min(numel, b + chunk) - b) % _VEC_STEP == 0 for b in range(0, numel, chunk))


def _openmp() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


def _prunable(w: torch.Tensor, norm: float) -> bool:
    """Where :func:`clip_search_pruned` is known to equal the loop: CPU, an exponent in (2, 4) that ATen
    computes with its general pow (not 3), the loop's pow fully vectorized, OpenMP threads."""
    rows, cols = w.shape
    return (
        w.device.type == "cpu"
        and rows * cols > 0
        and 2 < norm < 4
        and norm != 3.0
        and _pow_all_vectorized(rows * cols)
        and _openmp()
    )


def _half_powers(e: torch.Tensor, halves: int, out_b: torch.Tensor, out_c: torch.Tensor):
    """|e|^(halves/2) and |e|^(halves/2 + 1/2) (halves in 5..8) in ``out_b``/``out_c`` or swapped, from
    products and one square root, in preallocated buffers (a fresh tensor per op costs ~2x on CPU)."""
    root = torch.sqrt(e, out=out_b)
    torch.mul(e, e, out=out_c)  # |e|^2
    for _ in range(halves // 2 - 2):
        out_c.mul_(e)  # |e|^(halves // 2)
    if halves % 2:  # b = whole + 1/2, c = whole + 1
        return root.mul_(out_c), out_c.mul_(e)
    return out_c, root.mul_(out_c)  # b = whole, c = whole + 1/2


def clip_search_pruned(w: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, cfg: GridConfig):
    """The loop's per-row (scale, zero), each (rows,), bit for bit (see the notes above), computing
    |e|^clip_norm only for the candidates the moment bound cannot rule out."""
    rows, cols = w.shape
    bits, sym, q = cfg.bits, cfg.symmetric, cfg.clip_norm
    w = w.contiguous()
    params = [_scale_zero(p * xmin, p * xmax, bits, sym) for p in _candidates(cfg)]
    S = torch.stack([s for s, _ in params])  # (n, rows): every candidate's scale and zero, as the loop's
    Z = torch.stack([z for _, z in params])
    n = S.shape[0]
    # pass 1: lower bounds of every candidate's error sum from two cheap moments
    hb = int(2 * q) + 1  # b = hb/2, the first half-integer above q; c = b + 1/2
    lam = 0.5 / (hb / 2 + 0.5 - q)
    mb = torch.empty(n, rows, dtype=torch.float64)
    mc = torch.empty(n, rows, dtype=torch.float64)
    # blocks of (candidates, rows, cols) of at most _BLOCK elements
    rb = max(1, min(rows, _BLOCK // cols))
    kb = max(1, min(n, _BLOCK // (rb * cols)))
    bufs = [torch.empty(kb, rb, cols) for _ in range(3)]
    for r0 in range(0, rows, rb):
        wr = w[r0 : r0 + rb]
        for k0 in range(0, n, kb):
            k1 = min(n, k0 + kb)
            buf, out_b, out_c = (b[: k1 - k0, : wr.shape[0]] for b in bufs)
            sr, zr = S[k0:k1, r0 : r0 + rb, None], Z[k0:k1, r0 : r0 + rb, None]
            e = _clip_error(wr, sr, zr, bits, sym, buf)
            pb, pc = _half_powers(e, hb, out_b, out_c)
            mb[k0:k1, r0 : r0 + rb] = pb.sum(dim=-1)
            mc[k0:k1, r0 : r0 + rb] = pc.sum(dim=-1)
    # float32 sums of positive terms: relative error <= cols * 2^-24 (a few roundings per term
    # besides), absolute error of subnormal terms <= 2^-120 each: taken against the bound
    gamma = (cols + 4) * 2.0**-24
    tiny = cols * 2.0**-120
    num = (mb * (1 - gamma) - tiny).clamp_(min=0)
    den = (mc * (1 + gamma) + tiny).pow(1 - lam)
    lower = (num / den).pow(1 / lam)  # NaN where the moments are: never prunes
    # the loop's own sum may be off by the same rounding, and by pow's (<= 1 ulp; the float32 exponent
    # changes |e|^q by <= q * 2^-24 * |ln|e|| <= q * 2^-24 * 104 relatively)
    margin = 1 + 2e-3 + 2 * gamma + q * 2.0**-24 * 110

    exact = torch.full((n, rows), float("inf"))
    every = torch.arange(rows)
    # round 1: per row the candidate of smallest bound, exactly
    first = torch.nan_to_num(lower, nan=float("inf")).argmin(dim=0)
    exact[first, every] = _exact_errors(w, every, S[first, every], Z[first, every], bits, q)
    best = exact.min(dim=0).values
    # round 2: every candidate whose bound does not exceed that row's exact best
    keep = ~(lower > best.double() * margin + tiny)
    keep[first, every] = False
    ks, rs = keep.nonzero(as_tuple=True)
    if ks.numel():
        exact[ks, rs] = _exact_errors(w, rs, S[ks, rs], Z[ks, rs], bits, q)
    # the loop's choice: the first k of least error; NaN never wins; none below inf keeps candidate 0
    pick = torch.nan_to_num(exact, nan=float("inf")).argmin(dim=0)
    return S[pick, every], Z[pick, every]


def _clip_error(w, s, z, bits: int, symmetric: bool, out: torch.Tensor) -> torch.Tensor:
    """|fake_quantize(w, s, z) - w| with the zero point folded into the clamp bounds: clamp(r + z, 0, m) - z
    equals clamp(r, -z, m - z) exactly because r = round(w / s) and z are integers of magnitude below
    2^24 (|w / s| <= (2^bits - 1) / p; z in [0, 2^bits - 1]), so every sum is exact; NaN stays NaN."""
    out = torch.div(w, s, out=out).round_()
    if symmetric:  # one zero point for every row: scalar bounds
        zero = float(1 << (bits - 1))
        out.clamp_(-zero, max_code(bits) - zero)
    else:
        out.clamp_(-z, max_code(bits) - z)
    return out.mul_(s).sub_(w).abs_()


def _exact_errors(w, rows, s, z, bits: int, q: float) -> torch.Tensor:
    """sum |fake_quantize(w[r]) - w[r]|^q for each (row r, scale s, zero z), as the loop computes it:
    the same ops, in chunks of rows, with zero rows padding each pow so that ATen vectorizes every
    element of it."""
    cols = w.shape[1]
    step = max(1, _BLOCK // cols)
    return torch.cat(
        [
            _exact_chunk(w, rows[a : a + step], s[a : a + step], z[a : a + step], bits, q)
            for a in range(0, rows.numel(), step)
        ]
    )


def _exact_chunk(w, rows, s, z, bits: int, q: float) -> torch.Tensor:
    count, cols = rows.numel(), w.shape[1]
    padded = count
    while not _pow_all_vectorized(padded * cols):
        padded += 1
    wr = torch.zeros(padded, cols)
    wr[:count] = w[rows]
    sr = torch.ones(padded)
    sr[:count] = s
    zr = torch.zeros(padded)
    zr[:count] = z
    buf = torch.empty_like(wr)
    err = fake_quantize(wr, sr[:, None], zr[:, None], bits, out=buf)
    return err.sub_(wr).abs_().pow_(q).sum(dim=1)[:count]


def find_group_params(w: torch.Tensor, cfg: GridConfig, find=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero for every group of ``w``: (rows, n_groups) each. ``find``: the per-row search
    (default :func:`find_params`; the uniform format passes the CUDA kernel's)."""
    rows, cols = w.shape
    g = cols if cfg.group_size == -1 else cfg.group_size
    cfg.check_width(cols)
    # (rows, cols) -> (rows * n_groups, g): each group of a row is one row of the search
    wg = w.float().reshape(rows, cols // g, g).reshape(-1, g)
    scale, zero = (find or find_params)(wg, cfg)
    return scale.reshape(rows, cols // g), zero.reshape(rows, cols // g)


def expand_groups(t: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, n_groups) -> (rows, cols) by repeating each group's value over its columns."""
    return t.repeat_interleave(cols // t.shape[1], dim=1)


def rtn_quantize(w: torch.Tensor, cfg: GridConfig, find=None):
    """Round-to-nearest with the grid's (clipped) scales. Returns codes, scale, zero, w_hat."""
    scale, zero = find_group_params(w, cfg, find)
    s, z = expand_groups(scale, w.shape[1]), expand_groups(zero, w.shape[1])
    codes = quantize_codes(w.float(), s, z, cfg.bits)
    return codes, scale, zero, dequantize_codes(codes, s, z)
