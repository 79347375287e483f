"""Uniform grids against naive per-element loops (exact: integer codes, same float ops)."""

import itertools

import pytest
import torch

from rsq.config import GridConfig
from rsq.errors import ConfigError
from rsq.quant.grid import find_group_params, find_params, rtn_quantize


def naive_params(row, bits, symmetric, p=1.0):
    lo = min(min(row), 0.0) * p
    hi = max(max(row), 0.0) * p
    if symmetric:
        amax = max(hi, -lo)
        scale = amax / (2 ** (bits - 1) - 1) if amax > 0 else 1.0
        zero = float(2 ** (bits - 1))
    else:
        scale = (hi - lo) / (2**bits - 1) if hi > lo else 1.0
        zero = float(round(-lo / scale))
    return scale, zero


def naive_q(x, scale, zero, bits):
    # torch.round is round-half-to-even, like Python's round
    c = min(max(round(x / scale) + zero, 0), 2**bits - 1)
    return c, scale * (c - zero)


@pytest.mark.parametrize("bits,symmetric", itertools.product([2, 3, 4, 8], [True, False]))
def test_rtn_no_clip_matches_naive(bits, symmetric):
    torch.manual_seed(bits)
    W = torch.randn(5, 16, dtype=torch.float32)
    cfg = GridConfig(bits=bits, symmetric=symmetric, mse_clip=False)
    codes, scale, zero, w_hat = rtn_quantize(W, cfg)
    for r in range(5):
        row = W[r].tolist()
        s, z = naive_params(row, bits, symmetric)
        assert scale[r, 0].item() == pytest.approx(s, rel=1e-6)
        assert zero[r, 0].item() == z
        for c in range(16):
            code, val = naive_q(torch.tensor(row[c]).item(), scale[r, 0].item(), z, bits)
            assert codes[r, c].item() == code
            assert w_hat[r, c].item() == pytest.approx(val, rel=1e-6, abs=1e-7)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1


def test_symmetric_levels_are_signed_range():
    W = torch.linspace(-1, 1, 64)[None, :]
    codes, scale, zero, w_hat = rtn_quantize(W, GridConfig(bits=3, mse_clip=False))
    # scale = max|w| / 3: a row symmetric about 0 uses -3..3; -4 is reachable only when clipped
    assert (codes - zero).unique().tolist() == [-3, -2, -1, 0, 1, 2, 3]
    W = torch.tensor([[-1.0, -0.9, 0.2, 0.5]])
    s = torch.tensor([[0.2]])
    from rsq.quant.grid import quantize_codes

    assert (quantize_codes(W, s, torch.tensor([[4.0]]), 3) - 4).tolist() == [[-4, -4, 1, 2]]


def test_mse_clip_picks_best_shrink_per_row():
    torch.manual_seed(0)
    W = torch.randn(6, 64)
    W[0, 0] = 12.0  # an outlier makes clipping worthwhile in row 0
    cfg = GridConfig(bits=3, symmetric=True, mse_clip=True)
    scale, zero = find_params(W, cfg)
    for r in range(6):
        best, best_s = None, None
        for i in range(int(cfg.max_shrink * cfg.clip_grid)):
            p = 1 - i / cfg.clip_grid
            s, z = naive_params(W[r].tolist(), 3, True, p)
            err = sum(abs(naive_q(x, s, z, 3)[1] - x) ** cfg.clip_norm for x in W[r].tolist())
            if best is None or err < best - 1e-9:
                best, best_s = err, s
        assert scale[r, 0].item() == pytest.approx(best_s, rel=1e-5)
    assert scale[0, 0] < 12.0 / 3  # the outlier row was clipped


def test_group_params_equal_per_group_search():
    torch.manual_seed(1)
    W = torch.randn(4, 96)
    cfg = GridConfig(bits=4, group_size=32, symmetric=False)
    scale, zero = find_group_params(W, cfg)
    assert scale.shape == (4, 3)
    for g in range(3):
        s, z = find_params(W[:, g * 32 : (g + 1) * 32], cfg)
        assert torch.equal(scale[:, g], s[:, 0]) and torch.equal(zero[:, g], z[:, 0])


def test_bad_grid_options():
    with pytest.raises(ConfigError, match="outside 2..8"):
        GridConfig(bits=1)
    with pytest.raises(ConfigError, match="outside 2..8"):
        GridConfig(bits=9)
    with pytest.raises(ConfigError, match="does not divide"):
        GridConfig(group_size=100).check_width(576)
