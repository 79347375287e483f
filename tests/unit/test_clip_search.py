"""The pruned MSE clip search (rsq.quant.grid.clip_search_pruned) returns the scales and zeros of
the plain loop bit for bit. The oracle is the loop as it was before the pruned search existed,
copied here unchanged, so that a change to either rsq function cannot move the reference."""

from __future__ import annotations

import pytest
import torch

from rsq.config import GridConfig
from rsq.quant import grid as G


def oracle_find_params(w: torch.Tensor, cfg: GridConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """rsq.quant.grid.find_params as of main 8416d03 (one torch pass per candidate)."""
    w = w.float()
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    scale, zero = G._scale_zero(xmin, xmax, cfg.bits, cfg.symmetric)
    if cfg.mse_clip:
        best = torch.full_like(xmin, float("inf"))
        buf = torch.empty_like(w)
        for i in range(int(cfg.max_shrink * cfg.clip_grid)):
            p = 1 - i / cfg.clip_grid
            s1, z1 = G._scale_zero(p * xmin, p * xmax, cfg.bits, cfg.symmetric)
            err = G.fake_quantize(w, s1[:, None], z1[:, None], cfg.bits, out=buf)
            err = err.sub_(w).abs_().pow_(cfg.clip_norm).sum(dim=1)
            better = err < best
            if better.any():
                best = torch.where(better, err, best)
                scale = torch.where(better, s1, scale)
                zero = torch.where(better, z1, zero)
    return scale[:, None], zero[:, None]


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian rows with heavy-tailed outliers, a zero row, a constant row and a one-signed row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)
    spikes = torch.rand(rows, cols, generator=g) < 0.01
    w[spikes] *= 20
    w[0] = 0
    w[1] = 0.5
    w[2] = w[2].abs()
    return w


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


GRIDS = [
    GridConfig(bits=3),  # the demo's: symmetric, per channel
    GridConfig(bits=4, symmetric=False),
    GridConfig(bits=2),
    GridConfig(bits=8, symmetric=False),
    GridConfig(bits=3, clip_norm=2.2, clip_grid=50, max_shrink=0.5),
    GridConfig(bits=4, clip_norm=3.7),
]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"b{g.bits}{'s' if g.symmetric else 'a'}q{g.clip_norm}")
@pytest.mark.parametrize("shape", [(64, 576), (24, 1536), (5, 64), (300, 96)])
def test_pruned_search_equals_the_loop(threads, grid, shape):
    w = weights(*shape, seed=shape[0] + grid.bits)
    assert G._prunable(w, grid.clip_norm)  # these shapes take the pruned path
    got, want = G.find_params(w, grid), oracle_find_params(w, grid)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("group", [32, 64, 128])
def test_grouped_search_equals_the_loop(threads, group):
    w = weights(96, 768, seed=group)
    for grid in (GridConfig(bits=3, group_size=group), GridConfig(bits=4, group_size=group, symmetric=False)):
        scale, zero = G.find_group_params(w, grid)
        s, z = oracle_find_params(w.reshape(-1, group), grid)
        assert torch.equal(scale, s.reshape(96, -1)) and torch.equal(zero, z.reshape(96, -1))


def test_other_shapes_take_the_loop_and_equal_it(threads):
    """Where the loop's pow would run part of a row through ATen's scalar path (cols * rows not a whole
    number of vector steps per thread) the loop itself runs; the answer is the oracle's either way."""
    w = weights(7, 33, seed=3)
    assert not G._prunable(w, 2.4)
    got, want = G.find_params(w, GridConfig(bits=3)), oracle_find_params(w, GridConfig(bits=3))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_pruning_skips_most_candidates(monkeypatch):
    """The point of the pruned search: far fewer exact error sums than candidates x rows."""
    evaluated = []
    exact = G._exact_errors

    def counting(w, rows, *args):
        evaluated.append(rows.numel())
        return exact(w, rows, *args)

    monkeypatch.setattr(G, "_exact_errors", counting)
    w = weights(128, 576, seed=0)
    G.find_params(w, GridConfig(bits=3))
    assert sum(evaluated) < 0.25 * 80 * 128


def test_scalar_tail_of_pow_differs_from_its_vector_loop():
    """Why the pruned search checks vectorization: ATen's float32 pow with exponent 2.4 gives other bits
    in its scalar tail than in its vectorized loop, so re-batching the pow could change the loop's sums.
    If this ever stops holding, the check is merely conservative."""
    x = torch.rand(31 * 64, generator=torch.Generator().manual_seed(0)) * 3
    whole = x.pow(2.4)  # 1984 = 62 vector steps of 32
    tails = torch.cat([x[i : i + 31].pow(2.4) for i in range(0, x.numel(), 31)])  # 31 < 32: all scalar
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert not torch.equal(whole, tails)
