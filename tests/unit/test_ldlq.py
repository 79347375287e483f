"""E8P LDLQ against a deliberately naive float64 reference, against plain nearest rounding, and
its damping / dead-column / error paths."""

import functools

import pytest
import torch

from rsq.checkpoint.schema import dequantize_result
from rsq.config import GridConfig, SolverConfig
from rsq.errors import ConfigError, SingularHessianError
from rsq.quant.e8p import e8p_codebook, e8p_round
from rsq.solver.gptq import layer_error
from rsq.solver.ldlq import block_ldl, damped_block_ldl, ldlq_quantize

E8P = GridConfig(kind="e8p", bits=2)


def naive_block_ldl(H, b=8):
    """Block LDL by explicit block elimination (Schur complements), float64, no Cholesky:
    D_k = H_kk - Σ_{j<k} L_kj D_j L_kj^T,  L_ik = (H_ik - Σ_{j<k} L_ij D_j L_kj^T) D_k^-1."""
    m = H.shape[0] // b
    blk = lambda i: slice(i * b, (i + 1) * b)  # noqa: E731
    L = torch.zeros_like(H)
    D = [None] * m
    for k in range(m):
        S = H[blk(k), blk(k)].clone()
        for j in range(k):
            S -= L[blk(k), blk(j)] @ D[j] @ L[blk(k), blk(j)].T
        D[k] = S
        L[blk(k), blk(k)] = torch.eye(b, dtype=H.dtype)
        for i in range(k + 1, m):
            T = H[blk(i), blk(k)].clone()
            for j in range(k):
                T -= L[blk(i), blk(j)] @ D[j] @ L[blk(k), blk(j)].T
            L[blk(i), blk(k)] = T @ torch.linalg.inv(D[k])
    return L, D


@functools.lru_cache(maxsize=1)
def _codebook64():
    C = e8p_codebook().double()
    return C, C.T.contiguous(), (C * C).sum(1)


def brute_round(X):
    """Nearest codeword of each row of X over all 65536 codewords (float64 argmin)."""
    C, CT, cn = _codebook64()
    return C[(cn[None] - 2 * X @ CT).argmin(dim=1)]


def ldlq_naive(W, H, sigma, damp_frac=0.01, tune_iters=10):
    """Textbook LDLQ in float64: damp, block LDL by elimination, then row by row and block by block
    (last to first) round W_k + Σ_{j>k} (W_j - Q_j) L_jk by brute force, then ``tune_iters`` full
    sweeps re-rounding Q_k + (W - Q) H[:, k] H_kk^-1 (no early stop). Returns W_hat."""
    W = W.double() / sigma
    H = H.double()
    H = H + damp_frac * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    L, _ = naive_block_ldl(H)
    n = W.shape[1]
    m = n // 8
    Q = torch.zeros_like(W)
    for k in reversed(range(m)):
        for r in range(W.shape[0]):
            target = W[r, 8 * k : 8 * k + 8].clone()
            for j in range(k + 1, m):
                cj, ck = slice(8 * j, 8 * j + 8), slice(8 * k, 8 * k + 8)
                target += (W[r, cj] - Q[r, cj]) @ L[cj, ck]
            Q[r, 8 * k : 8 * k + 8] = brute_round(target[None])[0]
    for _ in range(tune_iters):
        for k in reversed(range(m)):
            c = slice(8 * k, 8 * k + 8)
            # Q_k + (W - Q) H[:, k] H_kk^-1, via a solve (H_kk symmetric)
            target = Q[:, c] + torch.linalg.solve(H[c, c], ((W - Q) @ H[:, c]).T).T
            Q[:, c] = brute_round(target)
    return Q * sigma


def random_hessian(n, tokens=256, seed=0, corr=0.3):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) @ (torch.eye(n) + corr * torch.randn(n, n, generator=g))
    return 2 * X.T @ X / tokens


def test_block_ldl_identity():
    H = random_hessian(32, seed=1).double()
    L, D = block_ldl(H)
    m = 4
    Dfull = torch.block_diag(*D)
    assert torch.allclose(L @ Dfull @ L.T, H, atol=1e-10, rtol=1e-10)
    # unit block-lower-triangular: identity diagonal blocks, zero above them
    for k in range(m):
        ck = slice(8 * k, 8 * k + 8)
        assert torch.allclose(L[ck, ck], torch.eye(8, dtype=H.dtype), atol=1e-12)
        assert torch.all(L[8 * k : 8 * k + 8, 8 * k + 8 :] == 0)
    Ln, Dn = naive_block_ldl(H)
    assert torch.allclose(L, Ln, atol=1e-9)
    assert torch.allclose(Dfull, torch.block_diag(*Dn), atol=1e-9)


@pytest.mark.parametrize("rows,cols,seed", [(16, 32, 0), (24, 64, 1), (8, 48, 2)])
def test_ldlq_equals_naive(rows, cols, seed):
    torch.manual_seed(seed)
    W = torch.randn(rows, cols)
    H = random_hessian(cols, seed=seed)
    res = ldlq_quantize(W, H, E8P, SolverConfig())
    ref = ldlq_naive(W, H, res.scale.item())
    # Same rounding decisions: the fast path (float32 feedback, pattern+parity rounding) and the
    # naive one (float64, brute force) differ only by float32 rounding (~1e-6 relative), far from
    # any Voronoi boundary for these seeds; weights then agree to float32 precision.
    assert torch.allclose(res.weight.double(), ref, atol=1e-5)
    assert res.codes.shape == (rows, cols // 8) and res.codes.dtype == torch.int32


def test_ldlq_equals_naive_without_tuning():
    torch.manual_seed(5)
    W = torch.randn(12, 40)
    H = random_hessian(40, seed=5)
    res = ldlq_quantize(W, H, E8P, SolverConfig(ldlq_tune_iters=0))
    ref = ldlq_naive(W, H, res.scale.item(), tune_iters=0)
    assert torch.allclose(res.weight.double(), ref, atol=1e-5)
    assert res.meta["tune_sweeps"] == 0


def nearest_rounding(W, sigma):
    _, v = e8p_round((W / sigma).reshape(-1, 8))
    return v.reshape(W.shape) * sigma


@pytest.mark.parametrize("corr", [0.3, 1.0])
def test_ldlq_beats_nearest_rounding(corr):
    ldlq, near = [], []
    for seed in range(4):
        torch.manual_seed(100 + seed)
        W = torch.randn(32, 64)
        H = random_hessian(64, seed=100 + seed, corr=corr)
        res = ldlq_quantize(W, H, E8P, SolverConfig())
        ldlq.append(res.loss)
        near.append(layer_error(W, nearest_rounding(W, res.scale.item()), H))
        # the reported loss is the undamped proxy tr(ΔHΔ^T)
        assert res.loss == pytest.approx(layer_error(W, res.weight, H), rel=1e-9)
    assert sum(ldlq) / 4 < sum(near) / 4, (ldlq, near)


def test_result_layout_and_scale():
    torch.manual_seed(0)
    W = torch.randn(16, 32) * 0.02
    H = random_hessian(32)
    res = ldlq_quantize(W, H, E8P, SolverConfig(ldlq_tune_iters=2))
    rms = W.double().pow(2).mean().sqrt().item()
    assert res.scale.shape == (1, 1) and res.scale.item() == pytest.approx(rms / 0.9, rel=1e-6)
    assert res.zero.shape == (1, 1) and torch.all(res.zero == 0)
    assert res.codes.min() >= 0 and res.codes.max() < 65536
    assert res.weight.dtype == torch.float32
    assert torch.equal(res.weight, dequantize_result(res, E8P))  # checkpoint contract, bitwise
    no_override = GridConfig(kind="e8p", bits=2, e8p_scale=-1)
    res2 = ldlq_quantize(W, H, no_override, SolverConfig(ldlq_tune_iters=0))
    assert res2.scale.item() == pytest.approx(rms / 1.03, rel=1e-6)  # override <= 0 -> 1.03


def test_dead_columns_and_zero_matrix():
    torch.manual_seed(0)
    W = torch.randn(8, 32)
    H = random_hessian(32)
    H[5, :] = 0
    H[:, 5] = 0
    res = ldlq_quantize(W, H, E8P, SolverConfig())
    assert torch.isfinite(res.weight).all()
    # a dead input never reaches the output: the loss ignores column 5 entirely
    assert res.loss == pytest.approx(layer_error(W, res.weight, H), rel=1e-9)
    zero = ldlq_quantize(torch.zeros(8, 16), random_hessian(16), E8P, SolverConfig())
    assert torch.all(zero.weight == 0) and zero.loss == 0


def test_width_not_multiple_of_8():
    with pytest.raises(ConfigError, match="20"):
        ldlq_quantize(torch.randn(4, 20), torch.eye(20), E8P, SolverConfig(), name="layers.0.mlp.down_proj")


def test_damping_retries_are_cumulative():
    # H - c·I with c just above the smallest eigenvalue: one damp of 1% fails, two succeed
    H = random_hessian(16, seed=3).double()
    mean = torch.diag(H).mean().item()
    c = torch.linalg.eigvalsh(H)[0].item() + 0.015 * mean
    Hs = H - c * torch.eye(16, dtype=torch.float64)
    L, D, Hd, damp, retries = damped_block_ldl(Hs, 0.01, 5)
    assert retries == 1
    assert damp == pytest.approx(0.02 * torch.diag(Hs).mean().item())
    res = ldlq_quantize(torch.randn(4, 16), Hs.float(), E8P, SolverConfig(damp_retries=5))
    assert res.meta["damp_retries"] == 1


def test_singular_hessian_raises_with_fix():
    H = -torch.eye(16)
    with pytest.raises(SingularHessianError, match=r"width 16.*nsamples"):
        ldlq_quantize(torch.randn(4, 16), H, E8P, SolverConfig(damp_retries=2))
    H = torch.eye(16)
    H[0, 0] = float("nan")
    with pytest.raises(SingularHessianError, match="NaN"):
        ldlq_quantize(torch.randn(4, 16), H, E8P, SolverConfig())
