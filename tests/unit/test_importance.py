"""Importance strategies (spec §3) and roll expansion (spec §5) against independent oracles.

Tolerances: chunked vs materialised attention only reorders float32 sums (and the matmul tiling),
so rtol 1e-5; float32 scores vs float64 Python loops: rtol 1e-5 (float32 rounding of norms/sums
over D <= 32 terms); weights vs a float64 re-derivation of min–max: rtol 1e-5. Masks, uniform,
rolls and the tokenfreq permutation are exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rsq.config import ImportanceConfig
from rsq.errors import CalibrationError, ConfigError
from rsq.importance import (
    STRATEGIES,
    ImportanceContext,
    attention_received,
    attention_received_naive,
    cap_weights,
    compute_weights,
    expand_rolls,
    rolled_window,
    strategy_needs,
    to_weights,
)

RTOL = 1e-5


def _qk(b, hq, hkv, t, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g) * 2
    k = torch.randn(b, hkv, t, d, generator=g) * 2
    return q.to(dtype), k.to(dtype)


# ---------------------------------------------------------------- attention received


@pytest.mark.parametrize(
    "b,hq,hkv,t,d,chunk",
    [
        (2, 4, 4, 37, 8, 8),  # MHA, T not divisible by chunk
        (2, 6, 2, 33, 16, 5),  # GQA 6/2, ragged last chunk
        (1, 6, 2, 64, 8, 64),  # one chunk
        (1, 3, 1, 20, 4, 1),  # one query per chunk, MQA
        (1, 2, 2, 16, 8, 100),  # chunk > T
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_chunked_matches_naive(b, hq, hkv, t, d, chunk, causal):
    q, k = _qk(b, hq, hkv, t, d)
    got = attention_received(q, k, causal=causal, query_chunk=chunk)
    want = attention_received_naive(q, k, causal=causal)
    assert got.shape == (b, t) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-6)


def test_chunked_matches_naive_bf16():
    # the same bf16 inputs go to both; both upcast to float32 before q·kᵀ and softmax
    q, k = _qk(2, 6, 2, 48, 16, seed=1, dtype=torch.bfloat16)
    got = attention_received(q, k, query_chunk=7)
    want = attention_received_naive(q, k)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=RTOL, atol=1e-6)


def test_gqa_head_mapping_against_python_loop():
    # query head h must use kv head h // (Hq / Hkv), as HF repeat_kv
    b, hq, hkv, t, d = 1, 6, 2, 6, 4
    q, k = _qk(b, hq, hkv, t, d, seed=2)
    got = attention_received(q, k, query_chunk=4)
    scale = 1 / math.sqrt(d)
    want = [0.0] * t
    qd, kd = q.double().tolist(), k.double().tolist()
    for h in range(hq):
        kv = h // (hq // hkv)
        for i in range(t):
            logits = [sum(a * c for a, c in zip(qd[0][h][i], kd[0][kv][j])) * scale for j in range(i + 1)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            for j in range(i + 1):
                want[j] += e[j] / sum(e)
    torch.testing.assert_close(got[0].double(), torch.tensor(want, dtype=torch.float64), rtol=RTOL, atol=1e-6)


def test_rows_sum_to_one_and_last_token():
    hq, t, d = 4, 50, 8
    q, k = _qk(1, hq, 2, t, d, seed=3)
    s = attention_received(q, k, query_chunk=t)
    # every causal softmax row sums to 1: Σ_j s_j = Hq·T
    assert math.isclose(float(s.sum()), hq * t, rel_tol=RTOL)
    # the last token is seen only by the last query: s_{T-1} = Σ_h A[h, T-1, T-1]
    kr = k.repeat_interleave(2, dim=1)[0]
    logits = (q[0, :, -1:] @ kr.transpose(-1, -2))[:, 0] / math.sqrt(d)  # (Hq, T)
    own = torch.softmax(logits.double(), dim=-1)[:, -1].sum()
    assert math.isclose(float(s[0, -1]), float(own), rel_tol=RTOL)


def test_zero_queries_give_harmonic_sums():
    # q = 0: query i spreads 1/(i+1) over keys 0..i, so s_j = Hq · Σ_{i>=j} 1/(i+1)
    hq, t = 3, 17
    q = torch.zeros(1, hq, t, 4)
    k = torch.randn(1, 1, t, 4)
    s = attention_received(q, k, query_chunk=5)[0].double()
    want = torch.tensor([hq * sum(1 / (i + 1) for i in range(j, t)) for j in range(t)], dtype=torch.float64)
    torch.testing.assert_close(s, want, rtol=RTOL, atol=0)


@pytest.mark.parametrize("normalize", ["linear", "sqrt"])
def test_attncon_normalize(normalize):
    t = 24
    q, k = _qk(2, 4, 2, t, 8, seed=4)
    cfg = ImportanceConfig(strategy="attncon", normalize=normalize, query_chunk=7)
    got = STRATEGIES["attncon"].fn(ImportanceContext(cfg=cfg, q=q, k=k))
    base = attention_received_naive(q, k)
    seen = [t - j for j in range(t)]  # queries i >= j see token j
    div = torch.tensor(seen if normalize == "linear" else [math.sqrt(n) for n in seen])
    torch.testing.assert_close(got, base / div, rtol=RTOL, atol=1e-6)


def test_attncon_weights_end_to_end():
    q, k = _qk(3, 4, 2, 32, 8, seed=5)
    cfg = ImportanceConfig(strategy="attncon", r_min=0.01, query_chunk=9)
    w = compute_weights("attncon", ImportanceContext(cfg=cfg, q=q, k=k))
    s = attention_received_naive(q, k)
    torch.testing.assert_close(w, _oracle_weights(s, 0.01, 1.0), rtol=RTOL, atol=1e-6)


# ---------------------------------------------------------------- raw-score strategies


def _x(b=2, t=9, dim=16, seed=6):
    return torch.randn(b, t, dim, generator=torch.Generator().manual_seed(seed)) * 3


def test_actnorm_actdiff_tokensim_against_loops():
    x, y = _x(), _x(seed=7)
    ctx = ImportanceContext(x=x, y=y)
    xd, yd = x.double().tolist(), y.double().tolist()
    b, t = x.shape[:2]
    norm = [[math.sqrt(sum(v * v for v in xd[i][j])) for j in range(t)] for i in range(b)]
    diff = [[math.sqrt(sum((p - r) ** 2 for p, r in zip(yd[i][j], xd[i][j]))) for j in range(t)] for i in range(b)]
    sim = [
        [sum(sum((p - r) ** 2 for p, r in zip(xd[i][j], xd[i][m])) for m in range(t)) / t for j in range(t)]
        for i in range(b)
    ]
    for name, want in [("actnorm", norm), ("actdiff", diff), ("tokensim", sim)]:
        got = STRATEGIES[name].fn(ctx).double()
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=RTOL, atol=0)


def test_tokensim_no_cancellation_with_large_offset():
    # a huge common offset (massive activation) must not swamp the small pairwise distances
    x = _x(1, 8, 16, seed=8)
    shifted = x + 1e4
    a = STRATEGIES["tokensim"].fn(ImportanceContext(x=x))
    c = STRATEGIES["tokensim"].fn(ImportanceContext(x=shifted))
    torch.testing.assert_close(c, a, rtol=1e-3, atol=0)  # only the float32 rounding of x + 1e4


def test_reverse_flags():
    assert STRATEGIES["actdiff"].reverse and STRATEGIES["tokenfreq"].reverse
    assert not any(STRATEGIES[n].reverse for n in ("attncon", "actnorm", "tokensim"))
    x, y = _x(), _x(seed=9)
    w = compute_weights("actdiff", ImportanceContext(x=x, y=y))
    d = (y - x).norm(dim=-1)
    assert torch.equal(w.argmax(dim=1), d.argmin(dim=1))  # least change = most important
    torch.testing.assert_close(w, _oracle_weights(d.amax(1, keepdim=True) - d, 0.005, 1.0), rtol=RTOL, atol=1e-6)


def test_tokenfreq_follows_its_sequence():
    g = torch.Generator().manual_seed(10)
    ids = torch.randint(0, 20, (5, 16), generator=g)
    counts = torch.bincount(ids.reshape(-1), minlength=20)
    cfg = ImportanceConfig(strategy="tokenfreq")
    w = compute_weights("tokenfreq", ImportanceContext(cfg=cfg, token_ids=ids, token_counts=counts))
    perm = torch.tensor([3, 0, 4, 1, 2])
    wp = compute_weights("tokenfreq", ImportanceContext(cfg=cfg, token_ids=ids[perm], token_counts=counts))
    assert torch.equal(wp, w[perm])
    # oracle: per-token count by Python loop, reversed
    c = torch.tensor([[float(counts[i]) for i in row] for row in ids.tolist()])
    torch.testing.assert_close(w, _oracle_weights(c.amax(1, keepdim=True) - c, 0.005, 1.0), rtol=RTOL, atol=1e-6)


# ---------------------------------------------------------------- masks


def _mask_weights(name, t, b=2):
    return compute_weights(name, ImportanceContext(x=torch.randn(b, t, 4)))


@pytest.mark.parametrize(
    "name,t,kept",
    [
        ("firstn", 64, range(0, 8)),
        ("heuristic", 64, range(0, 8)),
        ("0_8", 64, range(0, 8)),
        ("firstlastn", 64, [0, 1, 62, 63]),
        ("0_31_32", 128, [0, 1, 2, 3, 124, 125, 126, 127]),
        ("1_3_4", 16, [4, 5, 6, 7, 12, 13, 14, 15]),
        ("first_half", 10, range(0, 5)),
        ("second_half", 10, range(5, 10)),
    ],
)
def test_masks_select_their_tokens(name, t, kept):
    w = _mask_weights(name, t)
    want = torch.zeros(2, t)
    want[:, list(kept)] = t / len(kept)  # 0/1 renormalised to mean 1, no min–max floor
    assert torch.equal(w, want)


def test_mask_errors():
    with pytest.raises(ConfigError, match=r"divisible by 8, but T = 30"):
        _mask_weights("firstn", 30)
    with pytest.raises(ConfigError) as e:
        _mask_weights("1_3_4", 18)
    assert "18" in str(e.value) and "4" in str(e.value)
    with pytest.raises(ConfigError):
        strategy_needs("4_4")  # chunk index out of range
    with pytest.raises(ValueError, match="reverse"):
        to_weights(torch.ones(1, 4), ImportanceConfig(), reverse=True, bounded=False)


# ---------------------------------------------------------------- to_weights


def _oracle_weights(s, r_min, r_max, lo=None, hi=None):
    """Float64 re-derivation of min–max + clamp + mean-1, one Python row at a time."""
    out = []
    for i, row in enumerate(s.double().tolist()):
        a = min(row) if lo is None else lo[i]
        z = max(row) if hi is None else hi[i]
        r = [min(max(r_min + (r_max - r_min) * (v - a) / (z - a), r_min), r_max) for v in row]
        m = sum(r) / len(r)
        out.append([v / m for v in r])
    return torch.tensor(out, dtype=torch.float32)


def test_minmax_endpoints_and_mean_one():
    s = torch.rand(4, 50, generator=torch.Generator().manual_seed(11)) * 7 + 2
    cfg = ImportanceConfig(r_min=0.02, r_max=0.8)
    w = to_weights(s, cfg, reverse=False)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, _oracle_weights(s, 0.02, 0.8), rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(w.mean(dim=1), torch.ones(4), rtol=RTOL, atol=0)
    ratio = w.amax(dim=1) / w.amin(dim=1)  # only r_max / r_min survives the renormalisation
    torch.testing.assert_close(ratio, torch.full((4,), 40.0), rtol=RTOL, atol=0)
    assert torch.equal(w.argmax(1), s.argmax(1)) and torch.equal(w.argmin(1), s.argmin(1))


def test_docstring_example():
    w = to_weights(torch.tensor([[0.0, 1.0, 3.0]]), ImportanceConfig(), reverse=False)
    r = [0.005, 0.005 + 0.995 / 3, 1.0]
    torch.testing.assert_close(w[0], torch.tensor([v / (sum(r) / 3) for v in r]), rtol=RTOL, atol=0)


def test_reverse_equals_flipped_scores():
    s = torch.rand(3, 20, generator=torch.Generator().manual_seed(12))
    cfg = ImportanceConfig()
    torch.testing.assert_close(
        to_weights(s, cfg, reverse=True),
        to_weights(s.amax(1, keepdim=True) - s, cfg, reverse=False),
        rtol=RTOL,
        atol=1e-6,
    )


def test_power_before_reverse():
    s = torch.rand(2, 30, generator=torch.Generator().manual_seed(13)) + 0.1
    cfg2 = ImportanceConfig(power=2.0)
    for rev in (False, True):
        torch.testing.assert_close(
            to_weights(s, cfg2, reverse=rev), to_weights(s**2, ImportanceConfig(), reverse=rev), rtol=RTOL, atol=1e-6
        )


def test_quantile_against_numpy():
    s = torch.rand(2, 41, generator=torch.Generator().manual_seed(14))
    s[0, 5] = 100.0  # outlier: min–max would squash every other token to ~r_min
    q = 0.1
    w = to_weights(s, ImportanceConfig(quantile=q), reverse=False)
    sd = s.double().numpy()
    lo, hi = np.quantile(sd, q, axis=1), np.quantile(sd, 1 - q, axis=1)  # linear interpolation
    torch.testing.assert_close(w, _oracle_weights(s, 0.005, 1.0, lo.tolist(), hi.tolist()), rtol=RTOL, atol=1e-6)
    r = w[0] / w[0].min()  # clamped: everything above the upper quantile sits at r_max
    assert math.isclose(float(r[5]), 200.0, rel_tol=RTOL)


def test_constant_scores_and_uniform_are_exact_ones():
    s = torch.tensor([[3.0] * 7, [0.0, 1, 2, 3, 4, 5, 6]])
    w = to_weights(s, ImportanceConfig(), reverse=False)
    assert torch.equal(w[0], torch.ones(7))
    u = compute_weights("uniform", ImportanceContext(x=torch.randn(3, 11, 4)))
    assert u.dtype == torch.float32 and torch.equal(u, torch.ones(3, 11))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_raises_naming_strategy(bad):
    x = _x()
    x[1, 3, 0] = bad
    with pytest.raises(CalibrationError, match="actnorm"):
        compute_weights("actnorm", ImportanceContext(x=x))
    s = torch.rand(2, 5)
    s[0, 0] = bad
    with pytest.raises(CalibrationError, match="attncon"):
        to_weights(s, ImportanceConfig(strategy="attncon"), reverse=False)


# ---------------------------------------------------------------- registry


def test_registry_lookup_and_needs():
    assert strategy_needs("attncon") == {"q", "k"}
    assert strategy_needs("actdiff") == {"x", "y"}
    assert strategy_needs("tokenfreq") == {"token_ids", "token_counts"}
    assert strategy_needs("2_5_8") == {"x"}
    with pytest.raises(ConfigError) as e:
        strategy_needs("attention")
    for name in ("attncon", "actnorm", "firstn", "uniform", "a_b_..._N"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="y"):
        compute_weights("actdiff", ImportanceContext(x=_x()))


# ---------------------------------------------------------------- expansion


def test_expand_rolls_spec_example():
    ids = torch.arange(1, 9).unsqueeze(0)
    want = torch.tensor(
        [[1, 2, 3, 4, 5, 6, 7, 8], [7, 8, 1, 2, 3, 4, 5, 6], [5, 6, 7, 8, 1, 2, 3, 4], [3, 4, 5, 6, 7, 8, 1, 2]]
    )
    assert torch.equal(expand_rolls(ids, 4), want)


@pytest.mark.parametrize("factor", [1, 2, 4, 12])
def test_rolled_window_equals_rows(factor):
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(15))
    full = expand_rolls(ids, factor)
    assert full.shape == (3 * factor, 12)
    for i in range(3 * factor):
        assert torch.equal(rolled_window(ids, i, factor), full[i])
    assert torch.equal(full[::factor], ids)  # roll 0 of each window first
    with pytest.raises(IndexError):
        rolled_window(ids, 3 * factor, factor)


def test_expand_not_divisible():
    ids = torch.zeros(2, 10, dtype=torch.long)
    for fn in (lambda: expand_rolls(ids, 4), lambda: rolled_window(ids, 0, 4)):
        with pytest.raises(ConfigError, match="T = 10"):
            fn()


# ---------------------------------------------------------------------------------------------
# --importance-cap (issue 33): weights capped at K x the sequence median, then mean 1 again


def _cap_oracle(w: torch.Tensor, k: float) -> torch.Tensor:
    """Per sequence in float64 Python: lower median, min(w, k*median), divide by the mean."""
    out = []
    for row in w.double().tolist():
        med = sorted(row)[(len(row) - 1) // 2]  # torch.median's lower middle value
        capped = [min(v, k * med) for v in row] if med > 0 else row
        mean = sum(capped) / len(capped)
        out.append([v / mean for v in capped])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("t", [7, 64])  # odd and even lengths (lower median)
@pytest.mark.parametrize("k", [1.0, 2.5, 10.0])
def test_cap_weights_against_oracle(t, k):
    g = torch.Generator().manual_seed(31)
    w = torch.rand(3, t, generator=g) + 0.01
    w[:, 0] *= 80.0  # an attention-sink-like first token
    w = w / w.mean(dim=1, keepdim=True)
    got = cap_weights(w, k)
    torch.testing.assert_close(got.double(), _cap_oracle(w, k), rtol=RTOL, atol=0)
    torch.testing.assert_close(got.mean(dim=1), torch.ones(3), rtol=RTOL, atol=0)
    ratio = got.amax(dim=1) / got.median(dim=1).values
    assert (ratio <= k * (1 + RTOL)).all()  # the promise: no token above k x the median
    assert (ratio >= k * (1 - RTOL)).all()  # and here the sink was above it, so the cap binds


def test_cap_weights_worked_example_and_no_op():
    w = torch.tensor([[4.0, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(cap_weights(w, 2.0), torch.tensor([[12 / 7] + [6 / 7] * 5]), rtol=RTOL, atol=0)
    flat = torch.rand(2, 9, generator=torch.Generator().manual_seed(3)) + 1.0  # max < 2 x median
    flat = flat / flat.mean(dim=1, keepdim=True)
    torch.testing.assert_close(cap_weights(flat, 2.0), flat, rtol=RTOL, atol=1e-7)
    zero_median = torch.tensor([[0.0, 0.0, 0.0, 4.0]])  # the cap would zero it: left as it is
    assert torch.equal(cap_weights(zero_median, 3.0), zero_median)
    with pytest.raises(ValueError, match=">= 1"):
        cap_weights(w, 0.5)


def test_to_weights_with_cap_is_cap_of_uncapped_weights():
    s = torch.rand(4, 50, generator=torch.Generator().manual_seed(32))
    s[:, :2] += 30.0  # two sink tokens per sequence
    for reverse in (False, True):
        plain = to_weights(s, ImportanceConfig(), reverse=reverse)
        capped = to_weights(s, ImportanceConfig(cap=4.0), reverse=reverse)
        torch.testing.assert_close(capped.double(), _cap_oracle(plain, 4.0), rtol=RTOL, atol=0)
    # masks are 0/1 (median 0 for most): the cap applies to scored strategies only
    ctx = ImportanceContext(x=torch.randn(2, 16, 4), cfg=ImportanceConfig(cap=2.0))
    assert torch.equal(compute_weights("firstn", ctx), compute_weights("firstn", ImportanceContext(x=ctx.x)))


@pytest.mark.parametrize("cap", [0.5, -1.0, float("nan")])
def test_cap_below_one_is_refused(cap):
    with pytest.raises(ConfigError, match="--importance-cap"):
        ImportanceConfig(cap=cap)


def test_unknown_unrotated_weights_is_refused():
    with pytest.raises(ConfigError, match="--unrotated-weights"):
        ImportanceConfig(unrotated="capped")
