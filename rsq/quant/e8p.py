"""The E8P ("E8P12") 2-bit lattice codebook of QuIP# (Tseng et al. 2024, §4.2), in pure torch.

Definitions (Conway & Sloane notation, as the paper uses them):

* D8 = {x in Z^8 : sum(x) even};  D̂8 = D8 + 1/2 = {x in (Z + 1/2)^8 : sum(x) even};
  E8 = D8 ∪ D̂8.
* Abs patterns S (256 vectors a with entries in {1/2, 3/2, 5/2}):
  - the 227 distinct vectors |x| for x in D̂8 with ||x||^2 <= 10 — i.e. *every* pattern of
    entries in {1/2, 3/2, 5/2} with ||a||^2 <= 10 (any pattern gets an even sum by a sign choice):
    ||a||^2 = 2 (1 pattern), 4 (8), 6 (28), 8 (56 + 8), 10 (70 + 56);
  - 29 patterns of squared norm 12 with five entries 3/2 and three 1/2. QuIP# fixes which 29
    of the 56 such patterns it uses; :data:`NORM12_HALF_POSITIONS` lists them by the positions
    of their three 1/2 entries (no rule generates them; they are part of the published codebook).
* Codewords: c = s ⊙ a + t·1 with a in S, signs s in {±1}^8 such that s ⊙ a in D̂8 (even sum:
  the number of negative signs ≡ sum(a) mod 2, since negating an entry of odd 2a changes the
  sum by an odd integer), and shift t in {+1/4, -1/4}. 256 · 2^7 · 2 = 2^16 codewords, all in
  E8 + 1/4: for t = +1/4, c - 1/4 = s ⊙ a in D̂8; for t = -1/4, c - 1/4 = s ⊙ a - 1/2 in D8.
  They are distinct (s ⊙ a has no zero entry; the two shifts differ by 1/2 per coordinate, which
  no difference of two half-integer vectors can).

Index layout (ours, a 16-bit unsigned integer held in int32)::

    idx = a << 8 | h << 7 | s        a: abs-pattern index 0..255 (bits 15..8)
                                      h: 1 -> t = +1/4, 0 -> t = -1/4 (bit 7)
                                      s: bit i (i = 0..6) set <-> coordinate i is negative
    coordinate 7 is negative <-> (popcount(s) + sum(S[a])) is odd   (the parity constraint)

Abs patterns are ordered by squared norm, then lexicographically, so S[0] = (1/2, ..., 1/2) and
S[227:] are the 29 norm-12 patterns. Decoding is a pure function of the index (``e8p_decode``).

Rounding (``e8p_round``) is exact nearest-codeword search by the "abs pattern + sign/parity"
method: for a target y = x - t and a pattern a, the best admissible signs are s_i = sign(y_i),
except that when their parity is wrong the entry with the smallest a_i·|y_i| is flipped, so

    min_s ||y - s ⊙ a||^2 = ||y||^2 + ||a||^2 - 2 <a, |y|> + 4 [parity wrong] min_i a_i |y_i|,

minimised over the 256 patterns and the two shifts (2 × 256 candidates instead of 65536).
<a, |y|> for all patterns is one (M, 8) x (8, 256) matmul, and min_i a_i |y_i| is the least of
v · min{|y_i| : a_i = v} over v in {1/2, 3/2, 5/2}, read from the table of minima of |y| over all
256 coordinate subsets (8 doubling steps), so no (M, 256, 8) tensor is formed.
"""

from __future__ import annotations

import functools
import itertools

import torch

CODE_DIM = 8
N_PATTERNS = 256
N_CODES = 1 << 16

#: The 29 norm-12 abs patterns of E8P12: for each, the coordinates holding 1/2 (the other five
#: hold 3/2). All four triples inside {0,1,2,3}; 23 of the 24 sets {i} ∪ {j,k} with i < 4 <= j < k
#: (all but {1,4,5}); and {0,1,4}, {2,3,7}.
NORM12_HALF_POSITIONS: tuple[tuple[int, int, int], ...] = (
    (1, 2, 3),
    (0, 2, 3),
    (0, 1, 3),
    (0, 1, 2),
    (3, 6, 7),
    (3, 5, 7),
    (3, 4, 7),
    (3, 5, 6),
    (3, 4, 6),
    (3, 4, 5),
    (2, 6, 7),
    (2, 5, 7),
    (2, 4, 7),
    (2, 5, 6),
    (2, 4, 6),
    (2, 4, 5),
    (1, 6, 7),
    (1, 5, 7),
    (1, 4, 7),
    (1, 5, 6),
    (1, 4, 6),
    (0, 4, 5),
    (0, 6, 7),
    (0, 5, 7),
    (0, 4, 7),
    (0, 5, 6),
    (0, 4, 6),
    (0, 1, 4),
    (2, 3, 7),
)


@functools.lru_cache(maxsize=None)
def _abs_patterns_int() -> tuple[tuple[int, ...], ...]:
    """The 256 abs patterns as tuples of odd integers 2a (entries 1, 3, 5), in index order."""
    cube = itertools.product((1, 3, 5), repeat=CODE_DIM)
    small = [p for p in cube if sum(v * v for v in p) <= 40]  # ||a||^2 <= 10
    norm12 = [tuple(1 if i in pos else 3 for i in range(CODE_DIM)) for pos in NORM12_HALF_POSITIONS]
    pats = sorted(set(small)) + sorted(set(norm12))
    pats.sort(key=lambda p: (sum(v * v for v in p), p))  # stable: norm, then lexicographic
    assert len(small) == 227 and len(set(norm12)) == 29 and len(pats) == N_PATTERNS
    return tuple(pats)


@functools.lru_cache(maxsize=None)
def _tables(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (256, 8) float32 abs patterns, parity (256,) int64 = sum(a) mod 2, ||a||^2 (256,))."""
    twice = torch.tensor(_abs_patterns_int(), dtype=torch.int64)
    parity = (twice.sum(dim=1) // 2) % 2  # sum(a) = sum(2a)/2 is an integer (eight odd halves)
    A = (twice.float() / 2).to(device)
    return A, parity.to(device), (A * A).sum(dim=1)


def abs_patterns(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 abs patterns S (256, 8) float32 in index order (a copy)."""
    return _tables(str(device))[0].clone()


def _decode_formula(idx: torch.Tensor) -> torch.Tensor:
    """Codeword of each 16-bit index by the layout in the module docstring. idx: any int shape."""
    A, parity, _ = _tables(str(idx.device))
    idx = idx.long()
    a = (idx >> 8) & 0xFF
    shift = torch.where((idx >> 7) & 1 == 1, 0.25, -0.25)
    bit = torch.arange(7, device=idx.device)
    neg7 = (idx[..., None] >> bit) & 1  # (..., 7) sign bits of coordinates 0..6
    last = (neg7.sum(dim=-1) + parity[a]) % 2
    neg = torch.cat([neg7, last[..., None]], dim=-1).float()  # (..., 8)
    return (1 - 2 * neg) * A[a] + shift[..., None].float()


@functools.lru_cache(maxsize=None)
def _codebook(device: str) -> torch.Tensor:
    return _decode_formula(torch.arange(N_CODES, device=device))


def e8p_codebook(device: torch.device | str = "cpu") -> torch.Tensor:
    """All 2^16 codewords, (65536, 8) float32, row i = codeword of index i. Cached per device:
    treat the returned tensor as read-only."""
    return _codebook(str(torch.device(device)))


def e8p_decode(idx: torch.Tensor) -> torch.Tensor:
    """Codewords (M, 8) float32 of 16-bit indices idx (M,) (any integer dtype; values 0..65535).

    An int16 bit pattern (negative values) is accepted and read as unsigned."""
    idx = idx.long() & 0xFFFF
    return e8p_codebook(idx.device)[idx]


def e8p_dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W_hat (out, in) float32 = scale · codebook[codes] for codes (out, in / 8), scale (1, 1)."""
    rows = codes.shape[0]
    return (e8p_decode(codes.reshape(-1)).reshape(rows, -1) * scale.reshape(())).float()


def codes_to_int16(idx: torch.Tensor) -> torch.Tensor:
    """The int16 bit pattern of unsigned 16-bit indices (values 0..65535, any integer dtype): the
    storage dtype, 2 bits per weight; :func:`e8p_decode` reads it back as unsigned."""
    idx = idx.to(torch.int32) & 0xFFFF
    return (idx - (idx >= 1 << 15).to(torch.int32) * (1 << 16)).to(torch.int16)


def e8p_round(x: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest E8P codeword (Euclidean) of each row of x (M, 8).

    Returns (idx int32 (M,), values float32 (M, 8)) with values == e8p_decode(idx). Exact: the
    distance of the returned codeword equals the brute-force minimum over all 65536 codewords
    (up to float32 rounding in near-ties). Works on x's device; memory O(chunk · 256).
    """
    if x.ndim != 2 or x.shape[1] != CODE_DIM:
        raise ValueError(f"e8p_round expects (M, 8) vectors, got shape {tuple(x.shape)}")
    x = x.float()
    idx = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    for i in range(0, x.shape[0], chunk):
        idx[i : i + chunk] = _round_chunk(x[i : i + chunk])
    return idx, e8p_decode(idx)


@functools.lru_cache(maxsize=None)
def _value_masks(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each pattern, the coordinate sets (8-bit masks, (256,) int64) holding 1/2, 3/2, 5/2."""
    twice = torch.tensor(_abs_patterns_int(), dtype=torch.int64)
    bit = 1 << torch.arange(CODE_DIM)
    return tuple(((twice == v).long() * bit).sum(dim=1).to(device) for v in (1, 3, 5))


def _subset_minima(u: torch.Tensor) -> torch.Tensor:
    """(M, 256): column S = min of u[:, i] over the coordinates i in the bit set S (+inf if empty)."""
    t = torch.full((u.shape[0], 1), float("inf"), dtype=u.dtype, device=u.device)
    for b in range(CODE_DIM):  # columns with bit b set = columns without it, min'ed with u_b
        t = torch.cat([t, torch.minimum(t, u[:, b : b + 1])], dim=1)
    return t


def _round_chunk(x: torch.Tensor) -> torch.Tensor:
    A, parity, norm_a = _tables(str(x.device))
    masks = _value_masks(str(x.device))
    m = x.shape[0]
    # both shifts at once: rows [0, m) target t = +1/4 (h = 1), rows [m, 2m) t = -1/4 (h = 0)
    y = torch.cat([x - 0.25, x + 0.25])  # (2M, 8) targets for s ⊙ a
    ay = y.abs()
    neg = y < 0
    # min_i a_i |y_i| = min over the values v of v · (min |y_i| over the coordinates a_i = v)
    sub = _subset_minima(ay)
    fix = sub.index_select(1, masks[0]).mul_(0.5)
    for v, mask in ((1.5, masks[1]), (2.5, masks[2])):
        fix = torch.minimum(fix, sub.index_select(1, mask).mul_(v))
    wrong = (neg.sum(dim=1, keepdim=True) % 2) != parity[None, :]  # (2M, 256)
    # ||y - s⊙a||^2 - ||y||^2 = ||a||^2 - 2 <a, |y|> + 4 [parity wrong] min_i a_i |y_i|
    d = torch.addmm(norm_a[None, :], ay, A.T, alpha=-2).add_(fix.mul_(wrong), alpha=4)
    d, a = d.min(dim=1)  # (2M,)
    d = d + (y * y).sum(dim=1)
    # signs of the chosen pattern: sign(y), with the cheapest entry flipped if parity is wrong
    rows = torch.arange(2 * m, device=x.device)
    at = (ay * A[a]).argmin(dim=1)
    flip = torch.nn.functional.one_hot(at, CODE_DIM).bool() & wrong[rows, a, None]
    neg = neg ^ flip
    bits = (neg[:, :7].long() << torch.arange(7, device=x.device)).sum(dim=1)
    code = a << 8 | bits
    code[:m] |= 1 << 7
    take = d[m:] < d[:m]  # ties keep the +1/4 codeword
    return torch.where(take, code[m:], code[:m]).to(torch.int32)
