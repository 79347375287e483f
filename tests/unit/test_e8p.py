"""E8P codebook: its defining properties against an independent enumeration of the lattice, and
the fast rounding against brute-force search over all 65536 codewords."""

import itertools

import pytest
import torch

from rsq.quant.e8p import (
    N_CODES,
    abs_patterns,
    e8p_codebook,
    e8p_decode,
    e8p_round,
)


def _shift_of(idx):
    return torch.where((idx >> 7) & 1 == 1, 0.25, -0.25)[:, None]


def test_codebook_shape_dtype_distinct():
    C = e8p_codebook()
    assert C.shape == (N_CODES, 8) and C.dtype == torch.float32
    assert torch.unique(C, dim=0).shape[0] == N_CODES


def test_every_codeword_is_in_e8_plus_quarter():
    # E8 = D8 ∪ (D8 + 1/2): all-integer or all-half-integer coordinates with an even sum.
    # Codewords are multiples of 1/4, so every quantity below is exact in float32.
    u = e8p_codebook().double() - 0.25
    twice = 2 * u
    assert torch.equal(twice, twice.round())
    odd = twice.remainder(2) == 1
    assert (odd.all(dim=1) | (~odd).all(dim=1)).all()  # all integer or all half-integer
    s = u.sum(dim=1)
    assert torch.equal(s, s.round()) and (s.remainder(2) == 0).all()


def test_half_of_codebook_is_d8hat_ball_of_radius_sqrt10():
    """Independent oracle: enumerate D̂8 = {x in (Z+1/2)^8, sum even} with ||x||^2 <= 10 directly
    (entries are in ±{1/2, 3/2, 5/2} since 5/2^2 + 7/4 > 10 excludes 7/2); it must be exactly
    {c - t : abs index < 227} for either shift t, each point once."""
    vals = torch.tensor([-5, -3, -1, 1, 3, 5])  # 2x
    grid = torch.cartesian_prod(*[vals] * 8)  # (6^8, 8), 2x
    keep = ((grid * grid).sum(1) <= 40) & ((grid.sum(1) // 2) % 2 == 0)
    ref = grid[keep]
    assert ref.shape[0] == 227 * 128

    def key(t2):  # integer vectors with entries in -5..5 -> one int64 each
        return ((t2 + 5) * (11 ** torch.arange(8))).sum(1).sort().values

    idx = torch.arange(N_CODES)
    low = (idx >> 8) < 227
    base = (2 * (e8p_codebook() - _shift_of(idx))).round().long()
    for h in (0, 1):
        sel = low & (((idx >> 7) & 1) == h)
        assert torch.equal(key(base[sel]), key(ref))


def test_norm12_patterns_and_norm_distribution():
    A = abs_patterns()
    sq = (A * A).sum(1)
    # squared norms of the 256 abs patterns: 2, 4, 6, 8, 10 (all of them) and 29 of norm 12
    counts = {v: int((sq == v).sum()) for v in (2, 4, 6, 8, 10, 12)}
    assert counts == {2: 1, 4: 8, 6: 28, 8: 64, 10: 126, 12: 29}
    top = A[sq == 12]
    assert ((top == 1.5).sum(1) == 5).all() and ((top == 0.5).sum(1) == 3).all()
    assert torch.unique(A, dim=0).shape[0] == 256
    # each pattern appears with 128 sign patterns x 2 shifts
    idx = torch.arange(N_CODES)
    n2 = ((e8p_codebook() - _shift_of(idx)) ** 2).sum(1)
    hist = {v: int((n2 == v).sum()) for v in (2, 4, 6, 8, 10, 12)}
    assert hist == {v: 256 * c for v, c in counts.items()}


def test_index_layout_and_parity():
    idx = torch.arange(N_CODES)
    C = e8p_codebook()
    core = C - _shift_of(idx)  # s ⊙ a
    A = abs_patterns()
    assert torch.equal(core.abs(), A[idx >> 8])  # bits 15..8: abs pattern
    neg = core < 0
    bits = (idx[:, None] >> torch.arange(7)) & 1
    assert torch.equal(neg[:, :7], bits.bool())  # bits 0..6: signs of coordinates 0..6
    # parity: number of negative entries ≡ sum(a) (mod 2), i.e. s ⊙ a has an even sum
    parity = (A.sum(1)[idx >> 8].round().long()) % 2
    assert torch.equal(neg.sum(1) % 2, parity)
    # decode is a function of the index alone; int16 bit patterns read as unsigned
    assert torch.equal(e8p_decode(idx), C)
    assert torch.equal(e8p_decode(idx.to(torch.int16)), C)


def _brute(x):
    """min_c ||x - c||^2 over all 65536 codewords, float64, 256 rows at a time."""
    C = e8p_codebook().double()
    cn = (C * C).sum(1)[None]
    out = []
    for xc in x.double().split(256):
        out.append(((xc * xc).sum(1, keepdim=True) - 2 * xc @ C.T + cn).min(dim=1).values)
    return torch.cat(out)


@pytest.mark.parametrize("spread", [0.3, 1.0, 2.0, 4.0])
def test_round_equals_brute_force(spread):
    g = torch.Generator().manual_seed(int(spread * 10))
    x = torch.randn(768, 8, generator=g) * spread
    x[:100] += 0.25  # targets near the +1/4 coset too
    idx, vals = e8p_round(x)
    assert idx.dtype == torch.int32 and idx.min() >= 0 and idx.max() < N_CODES
    assert torch.equal(vals, e8p_decode(idx))
    got = ((x.double() - vals.double()) ** 2).sum(1)
    # e8p_round scores candidates in float32: a near-tie may resolve to the other codeword, whose
    # distance exceeds the minimum by at most float32 rounding (~1e-6 relative)
    assert torch.allclose(got, _brute(x), rtol=1e-5, atol=1e-5)


def test_round_special_inputs():
    # codewords round to themselves (distance 0 is unique, so the index is recovered)
    idx = torch.randint(0, N_CODES, (500,), generator=torch.Generator().manual_seed(0))
    back, vals = e8p_round(e8p_decode(idx))
    assert torch.equal(back.long(), idx)
    # exact zeros and integer grids (many ties): distances still minimal
    x = torch.cat([torch.zeros(1, 8), torch.eye(8), torch.full((1, 8), 0.5), torch.full((1, 8), -0.25)])
    _, vals = e8p_round(x)
    got = ((x.double() - vals.double()) ** 2).sum(1)
    assert torch.allclose(got, _brute(x), atol=1e-6)
    with pytest.raises(ValueError, match="8"):
        e8p_round(torch.zeros(3, 4))


def test_chunking_does_not_change_result():
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(3))
    a, _ = e8p_round(x)
    b, _ = e8p_round(x, chunk=37)
    assert torch.equal(a, b)


def test_norm12_positions_are_distinct_triples():
    from rsq.quant.e8p import NORM12_HALF_POSITIONS

    assert len(set(NORM12_HALF_POSITIONS)) == 29
    assert all(len(set(t)) == 3 and max(t) < 8 for t in NORM12_HALF_POSITIONS)
    assert set(NORM12_HALF_POSITIONS) <= set(itertools.combinations(range(8), 3))


def test_int16_storage_round_trips_every_index():
    # the checkpoint stores the unsigned 16-bit index as an int16 bit pattern (2 bits per weight)
    from rsq.quant.e8p import codes_to_int16

    idx = torch.arange(1 << 16, dtype=torch.int32)
    stored = codes_to_int16(idx)
    assert stored.dtype == torch.int16
    assert torch.equal(stored.to(torch.int32) & 0xFFFF, idx)
    assert torch.equal(e8p_decode(stored), e8p_decode(idx))
