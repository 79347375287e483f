"""NormalFloat grid: levels against the normal quantiles (stdlib) and QLoRA's published NF4 table,
nearest-level rounding against brute force, and the MSE clip search against a naive loop."""

from statistics import NormalDist

import pytest
import torch

from rsq.checkpoint.schema import dequantize_result
from rsq.config import GridConfig
from rsq.errors import ConfigError
from rsq.quant.grid import expand_groups
from rsq.quant.nf import (
    NF_OFFSET,
    nf_dequantize,
    nf_fake_quantize,
    nf_find_params,
    nf_levels,
    nf_quantize_codes,
    nf_rtn_quantize,
)
from rsq.solver.result import QuantResult

# bitsandbytes / QLoRA NF4 (computed there in float32)
NF4_QLORA = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_levels_structure(bits):
    lv = nf_levels(bits)
    n = 1 << (bits - 1)
    assert lv.shape == (1 << bits,) and lv.dtype == torch.float32
    assert torch.all(lv[1:] > lv[:-1])  # strictly ascending
    assert lv[0].item() == -1.0 and lv[-1].item() == 1.0  # exact endpoints
    assert lv[n - 1].item() == 0.0 and int((lv == 0).sum()) == 1  # one exact zero
    assert int((lv < 0).sum()) == n - 1 and int((lv > 0).sum()) == n
    assert lv.abs().max().item() == 1.0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_levels_are_normal_quantiles(bits):
    # independent oracle: Python's statistics.NormalDist inverse CDF
    nd = NormalDist()
    n = 1 << (bits - 1)
    top = nd.inv_cdf(NF_OFFSET)
    pos = [nd.inv_cdf(0.5 + (NF_OFFSET - 0.5) * i / n) / top for i in range(n + 1)]
    neg = [-nd.inv_cdf(0.5 + (NF_OFFSET - 0.5) * i / (n - 1)) / top for i in range(1, n)]
    ref = torch.tensor(sorted(neg) + pos, dtype=torch.float64)
    assert torch.allclose(nf_levels(bits).double(), ref, atol=1e-6)  # float32 storage


def test_nf4_matches_qlora_table():
    # the published table was computed with float32 linspace/ppf: agreement to ~1e-7
    ref = torch.tensor(NF4_QLORA, dtype=torch.float64)
    assert torch.allclose(nf_levels(4).double(), ref, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nearest_level_equals_brute_force(bits):
    lv = nf_levels(bits)
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 200, generator=g) * 0.7
    scale = torch.rand(64, 1, generator=g) + 0.2
    codes = nf_quantize_codes(w, scale, lv)
    assert codes.dtype == torch.uint8 and int(codes.max()) < (1 << bits)
    x = (w / scale).double()
    dist = (x[..., None] - lv.double()).abs()  # (64, 200, levels)
    got = dist.gather(-1, codes.long()[..., None])[..., 0]
    assert torch.allclose(got, dist.min(dim=-1).values, atol=1e-7)  # float32 division of w/scale
    # exact midpoints go to the lower level; out-of-range values clamp to the end levels
    mid = (lv[1:] + lv[:-1]) / 2
    at_mid = nf_quantize_codes(mid, torch.tensor(1.0), lv).long()
    assert torch.equal(at_mid, torch.arange(len(lv) - 1))
    ends = nf_quantize_codes(torch.tensor([-5.0, 5.0]), torch.tensor(1.0), lv).long()
    assert ends.tolist() == [0, len(lv) - 1]


def test_fake_quantize_and_dequantize():
    lv = nf_levels(3)
    w = torch.randn(8, 16)
    s = torch.rand(8, 1) + 0.5
    c = nf_quantize_codes(w, s, lv)
    assert torch.equal(nf_fake_quantize(w, s, lv), nf_dequantize(c, s, lv))
    assert torch.equal(nf_dequantize(c, s, lv), s * lv[c.long()])


def _err(w, s, lv, norm):
    return (nf_fake_quantize(w, s[:, None], lv) - w).abs().pow(norm).sum(1)


def test_mse_search_equals_naive_and_never_worse_than_p1():
    cfg = GridConfig(kind="nf", bits=3)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 128, generator=g) * torch.rand(16, 1, generator=g)
    w[:4, 0] *= 20  # outliers make clipping worthwhile
    scale = nf_find_params(w, cfg)[:, 0]
    lv = nf_levels(3)
    amax = w.abs().amax(1)
    # naive: try every candidate p for every row, keep the first minimum
    for r in range(16):
        errs = [
            _err(w[r : r + 1], (1 - i / cfg.clip_grid) * amax[r : r + 1], lv, cfg.clip_norm).item()
            for i in range(int(cfg.max_shrink * cfg.clip_grid))
        ]
        best = min(range(len(errs)), key=lambda i: (errs[i], i))
        want = (1 - best / cfg.clip_grid) * amax[r].item()
        assert scale[r].item() == pytest.approx(want, rel=1e-6)
    assert torch.all(_err(w, scale, lv, cfg.clip_norm) <= _err(w, amax, lv, cfg.clip_norm))
    plain = nf_find_params(w, GridConfig(kind="nf", bits=3, mse_clip=False))[:, 0]
    assert torch.equal(plain, amax)


def test_groups_and_zero_rows():
    cfg = GridConfig(kind="nf", bits=4, group_size=16)
    w = torch.randn(6, 64)
    w[2] = 0
    s = nf_find_params(w, cfg)
    assert s.shape == (6, 4)
    per = GridConfig(kind="nf", bits=4)
    for k in range(4):
        assert torch.equal(s[:, k], nf_find_params(w[:, 16 * k : 16 * k + 16], per)[:, 0])
    assert torch.all(s[2] == 1)
    codes, scale, w_hat = nf_rtn_quantize(w, cfg)
    assert torch.all(w_hat[2] == 0)
    with pytest.raises(ConfigError, match="does not divide"):
        nf_find_params(torch.randn(2, 40), cfg)


def test_matches_checkpoint_contract():
    cfg = GridConfig(kind="nf", bits=3, group_size=8)
    w = torch.randn(4, 32)
    codes, scale, w_hat = nf_rtn_quantize(w, cfg)
    res = QuantResult(codes=codes, scale=scale, zero=torch.zeros_like(scale), weight=w_hat, loss=0.0)
    assert torch.equal(dequantize_result(res, cfg), w_hat)
    assert torch.equal(w_hat, nf_dequantize(codes, expand_groups(scale, 32), nf_levels(3)))
