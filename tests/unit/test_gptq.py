"""GPTQ against a deliberately naive column-by-column reference, and against RTN."""

import pytest
import torch

from rsq.config import GridConfig, SolverConfig
from rsq.errors import SingularHessianError
from rsq.quant.grid import fake_quantize, find_params
from rsq.quant.nf import nf_find_params, nf_levels
from rsq.solver.gptq import gptq_quantize, layer_error, rtn_result
from rsq.solver.hessian import HessianAccumulator


def naive_gptq(W, H, grid, damp_frac=0.01):
    """Textbook GPTQ in float64: quantize column j, then spread its error over the remaining
    columns with the inverse Hessian of the remaining columns (no blocks, no Cholesky trick)."""
    W = W.double().clone()
    H = H.double().clone()
    n = W.shape[1]
    H += damp_frac * torch.diag(H).mean() * torch.eye(n, dtype=H.dtype)
    if grid.kind == "nf":
        scale = nf_find_params(W.float(), grid).double()[:, 0]
        levels = nf_levels(grid.bits).double()

        def quant(col):
            return scale * levels[torch.argmin((col[:, None] / scale[:, None] - levels[None, :]).abs(), dim=1)]
    else:
        scale, zero = find_params(W.float(), grid)
        scale, zero = scale.double()[:, 0], zero.double()[:, 0]

        def quant(col):
            return fake_quantize(col, scale, zero, grid.bits)

    Q = torch.zeros_like(W)
    for j in range(n):
        Hinv = torch.linalg.inv(H[j:, j:])
        q = quant(W[:, j])
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[0, 0]
        W[:, j:] -= err[:, None] * Hinv[0, :][None, :]
    return Q


def random_hessian(n, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) @ torch.randn(n, n, generator=g) * 0.3
    return 2 * X.T @ X / tokens


@pytest.mark.parametrize("n,block", [(32, 128), (48, 16), (40, 7)])
def test_gptq_equals_naive(n, block):
    torch.manual_seed(n)
    W = torch.randn(12, n)
    H = random_hessian(n, seed=n)
    grid = GridConfig(bits=3)
    res = gptq_quantize(W, H, grid, SolverConfig(block_size=block))
    ref = naive_gptq(W, H, grid)
    # Same decisions; float32 Cholesky vs float64 inverses differ by ~1e-6 relative, far below a
    # quantization step, so every rounding decision agrees and weights match to float32 precision.
    assert torch.allclose(res.weight.double(), ref, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_nf_grid_equals_naive(bits):
    torch.manual_seed(bits)
    W = torch.randn(10, 40)
    H = random_hessian(40, seed=bits)
    grid = GridConfig(kind="nf", bits=bits)
    res = gptq_quantize(W, H, grid, SolverConfig(block_size=16))
    assert torch.allclose(res.weight.double(), naive_gptq(W, H, grid), atol=1e-4)
    levels = nf_levels(bits)
    assert torch.equal(res.weight, res.scale * levels[res.codes.long()])


def test_gptq_beats_rtn_on_correlated_hessian():
    losses = []
    for seed in range(4):
        torch.manual_seed(seed)
        W = torch.randn(64, 64)
        H = random_hessian(64, seed=seed)
        g = gptq_quantize(W, H, GridConfig(bits=3), SolverConfig())
        r = rtn_result(W, GridConfig(bits=3))
        losses.append((layer_error(W, g.weight, H), layer_error(W, r.weight, H)))
    assert all(gl < rl for gl, rl in losses), losses


def test_gptq_group_and_act_order_codes_consistent():
    torch.manual_seed(3)
    W = torch.randn(8, 64)
    H = random_hessian(64, seed=3)
    for act_order in (False, True):
        grid = GridConfig(bits=4, group_size=16, symmetric=False)
        res = gptq_quantize(W, H, grid, SolverConfig(act_order=act_order))
        s = res.scale.repeat_interleave(16, dim=1)
        z = res.zero.repeat_interleave(16, dim=1)
        # codes, scales and zeros reproduce the written-back weight exactly
        assert torch.equal(s * (res.codes.float() - z), res.weight)
        assert res.scale.shape == (8, 4)


def test_dead_columns_are_zeroed():
    W = torch.randn(4, 16)
    H = random_hessian(16)
    H[3, :] = 0
    H[:, 3] = 0
    res = gptq_quantize(W, H, GridConfig(bits=4), SolverConfig())
    assert torch.all(res.weight[:, 3] == 0)


def test_singular_hessian_raises_after_bounded_retries():
    H = torch.full((8, 8), float("nan"))
    with pytest.raises(SingularHessianError, match="NaN"):
        gptq_quantize(torch.randn(4, 8), H, GridConfig(), SolverConfig())
    H = -torch.eye(8)  # negative definite: no damping of 1% rescues it
    with pytest.raises(SingularHessianError, match="not positive definite"):
        gptq_quantize(torch.randn(4, 8), H, GridConfig(), SolverConfig(damp_retries=3))


def test_hessian_accumulator_weighted_and_batched():
    torch.manual_seed(0)
    x = torch.randn(3, 10, 6)
    w = torch.rand(3, 10) * 2
    acc = HessianAccumulator(6)
    acc.add(x[:2], w[:2])
    acc.add(x[2], w[2])
    ref = sum(w[b, t] * torch.outer(x[b, t], x[b, t]) for b in range(3) for t in range(10)) * 2 / 3
    assert torch.allclose(acc.finalize(), ref, rtol=1e-5, atol=1e-6)
    # uniform weights are bit-identical to no weights
    a, b = HessianAccumulator(6), HessianAccumulator(6)
    a.add(x)
    b.add(x, torch.ones(3, 10))
    assert torch.equal(a.finalize(), b.finalize())


def test_inverse_cholesky_factor_is_upper_and_inverts():
    from rsq.solver.gptq import damped_inverse_cholesky

    H = random_hessian(40, seed=3)
    U, damp = damped_inverse_cholesky(H, 0.01, 2)
    Hd = H.double() + damp * torch.eye(40, dtype=torch.float64)
    assert torch.equal(U, U.triu()) and (torch.diag(U) > 0).all()
    # float32 factorisation of a matrix with condition ~1e4: ~1e-7 * 1e4 relative
    assert torch.allclose(U.double().T @ U.double() @ Hd, torch.eye(40, dtype=torch.float64), atol=1e-3)


def column_loop_block(ops, inner, W1, U1, S1, Z1):
    """rsq.solver.gptq._gptq_block's CPU path as of main 8416d03 (strided columns), the oracle of the
    row-major sub-block loop that replaced it."""
    W1 = W1.clone()
    U1 = U1.contiguous()
    B = W1.shape[1]
    C1, Q1, E1 = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
    L1 = torch.zeros(W1.shape[0], dtype=W1.dtype)
    for j1 in range(0, B, inner):
        j2 = min(j1 + inner, B)
        for i in range(j1, j2):
            w = W1[:, i]
            c, q = ops.round(w, S1[:, i], Z1[:, i])
            C1[:, i], Q1[:, i] = c, q
            err = (w - q) / U1[i, i]
            L1 += err * err / 2
            W1[:, i:j2] -= err[:, None] * U1[i, i:j2][None, :]
            E1[:, i] = err
        if j2 < B:
            W1[:, j2:] -= E1[:, j1:j2] @ U1[j1:j2, j2:]
    return C1, Q1, E1, L1


@pytest.mark.parametrize(
    "grid", [GridConfig(bits=3), GridConfig(bits=4, symmetric=False), GridConfig(kind="nf", bits=3)], ids=str
)
@pytest.mark.parametrize("rows,width,inner", [(300, 128, 16), (64, 40, 7), (17, 16, 1000)])
def test_cpu_block_equals_the_column_loop(grid, rows, width, inner):
    """The CPU sub-block runs on transposed copies: bit-identical codes, W_hat, errors and losses."""
    from rsq.solver.gptq import _gptq_block

    g = torch.Generator().manual_seed(rows)
    W = torch.randn(rows, width, generator=g)
    U = torch.linalg.cholesky(random_hessian(width, seed=rows) + torch.eye(width)).T.contiguous()
    ops = grid.format.ops(grid, torch.device("cpu"), "auto")
    if grid.kind == "nf":
        S, Z = nf_find_params(W, grid).expand(rows, width), torch.zeros(rows, width)
    else:
        s, z = find_params(W, grid)
        S, Z = s.expand(rows, width), z.expand(rows, width)
    got, want = _gptq_block(ops, inner, W, U, S, Z), column_loop_block(ops, inner, W, U, S, Z)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
