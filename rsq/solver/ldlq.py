"""LDLQ with the E8P codebook (QuIP# §3 / spec §6) as a pure function of (W, H, config).

LDLQ is GPTQ's error feedback written for vector codebooks. With the damped Hessian factored as
H = L D L^T (L unit block-lower-triangular with 8×8 blocks, D block-diagonal), the proxy loss is

    tr(Δ H Δ^T) = Σ_k || (Δ L)_k ||^2_{D_k},   Δ = W_hat - W,   (Δ L)_k = Δ_k + Σ_{j>k} Δ_j L_jk,

so quantizing the 8-column blocks from last to first, block k aims at
W_k + Σ_{j>k} (W_j - W_hat_j) L_jk and is rounded to the nearest E8P codeword (per row).
Then ``ldlq_tune_iters`` sweeps of block coordinate descent (last block to first): block k is
re-rounded from W_hat_k + (W - W_hat) H[:, k] H_kk^-1, the unconstrained minimiser of the loss over
that block with the others fixed.

Everything runs on W/σ with one scale per matrix, σ = RMS(W) / e8p_scale (spec §6: 0.9, the
QuIP# example value); an ``e8p_scale`` <= 0 means "no override", and the reference code's
constant 1.03 is used instead: σ = RMS(W) / 1.03. σ is taken from W before dead columns are
zeroed, as the reference code does. Stored weights are W_hat = σ · codebook[idx].
"""

from __future__ import annotations

import logging

import torch

from rsq.config import GridConfig, SolverConfig
from rsq.errors import ConfigError, SingularHessianError
from rsq.quant.e8p import CODE_DIM, e8p_dequantize, e8p_round
from rsq.solver.gptq import prepare_hessian
from rsq.solver.result import QuantResult

log = logging.getLogger(__name__)

E8P_DEFAULT_SCALE = 1.03  # RMS(W)/σ when GridConfig.e8p_scale <= 0 (reference code's _E8P_SCALE)


def e8p_sigma(W: torch.Tensor, e8p_scale: float) -> float:
    """σ = RMS(W) / e8p_scale, or RMS(W) / 1.03 if e8p_scale <= 0 (spec §6)."""
    rms = W.double().pow(2).mean().sqrt().item()
    return rms / (e8p_scale if e8p_scale > 0 else E8P_DEFAULT_SCALE)


def damped_block_ldl(
    H: torch.Tensor, damp_frac: float, retries: int, block: int = CODE_DIM, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, int]:
    """Damp H and factor it: H + damp·I = L diag(D_1..D_m) L^T, in float64.

    damp = damp_frac·mean(diag H); when a factorisation fails another damp_frac·mean(diag H) is
    added to the *original* H (cumulative: k+1 dampings on try k), at most ``retries`` times, then
    SingularHessianError. (With damp_frac = 0 the retries add 1e-4·mean(diag H) each.)
    Returns (L (n, n), D (m, b, b), H_damped (n, n), damp, retries used), all float64.
    """
    n = H.shape[0]
    if not torch.isfinite(H).all():
        raise SingularHessianError(
            f"the Hessian of {name or 'a module'} (width {n}) contains NaN/Inf: the calibration "
            "activations overflowed; use --dtype float32 or check the model weights"
        )
    H = H.double()
    mean_diag = torch.diag(H).mean().item()
    base = damp_frac * mean_diag
    step = base if base > 0 else 1e-4 * (mean_diag if mean_diag > 0 else 1.0)
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    for attempt in range(retries + 1):
        damp = base + attempt * step
        Hd = H + damp * eye
        C, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0 and torch.isfinite(C).all():
            L, D = _ldl_from_cholesky(C, block)
            if attempt:
                log.warning("%s: Hessian needed %d extra dampings (damp %.3g)", name or "module", attempt, damp)
            return L, D, Hd, damp, attempt
    raise SingularHessianError(
        f"the Hessian of {name or 'a module'} (width {n}) is not positive definite even after "
        f"{retries + 1} dampings of {damp_frac:.3g}*mean(diag H): use more calibration samples "
        "(--nsamples) or a larger damping (damp_frac / damp_retries)"
    )


def block_ldl(H: torch.Tensor, block: int = CODE_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    """Block LDL of an SPD H (n, n), n divisible by ``block``: H = L diag(D) L^T with L unit
    block-lower-triangular (identity diagonal blocks) and D (n/block, block, block) SPD.

    From the Cholesky factor H = C C^T: with C_k the k-th diagonal block of C,
    L = C · diag(C_k)^-1 and D_k = C_k C_k^T. Computed in float64.
    """
    return _ldl_from_cholesky(torch.linalg.cholesky(H.double()), block)


def _ldl_from_cholesky(C: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = C.shape[0]
    m = n // b
    Ck = torch.diagonal(C.reshape(m, b, m, b), dim1=0, dim2=2).permute(2, 0, 1)  # (m, b, b)
    cols = C.reshape(n, m, b).permute(1, 0, 2)  # (m, n, b): block column k of C
    # L_{:,k} = C_{:,k} C_k^-1  <=>  L_{:,k} C_k = C_{:,k}
    L = torch.linalg.solve_triangular(Ck, cols, upper=False, left=False)
    return L.permute(1, 0, 2).reshape(n, n), Ck @ Ck.mT


def ldlq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: GridConfig,
    solver: SolverConfig,
    name: str = "",
) -> QuantResult:
    """Quantize W (out, in) against the (importance-weighted) Hessian H (in, in) with E8P LDLQ.

    grid: its ``e8p_scale`` sets σ (see the module docstring); kind/bits are not consulted.
    solver: damp_frac, damp_retries (damping as in :func:`damped_block_ldl`), ldlq_tune_iters
        (refinement sweeps; they stop early once a sweep changes no code, which changes nothing
        since the sweep is deterministic).
    Dead inputs (diag H == 0) get H_jj = 1 and W[:, j] = 0 before solving.

    Returns QuantResult with codes (out, in/8) int32 (16-bit E8P indices, rsq.quant.e8p layout),
    scale (1, 1) = σ, zero (1, 1) = 0 (unused), weight = σ·codebook[codes] (out, in) float32, and
    loss = tr((W_hat - W) H (W_hat - W)^T) with W and H exactly as passed in (undamped, dead
    columns contributing nothing) — the full proxy, not GPTQ's halved, damped one.
    """
    rows, cols = W.shape
    if cols % CODE_DIM:
        raise ConfigError(
            f"the e8p grid quantizes 8 weights at a time, but {name or 'this layer'} has input "
            f"width {cols}, not a multiple of 8: use a scalar grid (--grid uniform/nf) for it"
        )
    sigma = e8p_sigma(W, grid.e8p_scale)
    W0, H0 = W, H
    W, H = prepare_hessian(W, H)
    L, _, Hd, damp, retries = damped_block_ldl(H, solver.damp_frac, solver.damp_retries, CODE_DIM, name)
    del H

    Wr = W / sigma if sigma > 0 else torch.zeros_like(W)  # all-zero W: σ = 0, W_hat = 0
    codes, sweeps = _ldlq_codes(Wr, L.to(W.dtype), Hd.to(W.dtype), solver.ldlq_tune_iters)
    scale = torch.tensor([[sigma]], dtype=torch.float32, device=W.device)
    # the format's own formula (rsq/formats/e8p.py), so the model and a reload agree bitwise
    W_hat = e8p_dequantize(codes, scale)
    D = (W_hat - W0.float()).double()
    loss = torch.einsum("ij,jk,ik->", D, H0.double(), D).item()
    return QuantResult(
        codes=codes,
        scale=scale,
        zero=torch.zeros(1, 1, device=W.device),
        weight=W_hat,
        loss=loss,
        damp=damp,
        meta={"algorithm": "ldlq", "grid": "e8p", "sigma": sigma, "tune_sweeps": sweeps, "damp_retries": retries},
    )


def _ldlq_codes(Wr: torch.Tensor, L: torch.Tensor, Hd: torch.Tensor, tune_iters: int) -> tuple[torch.Tensor, int]:
    """LDLQ on the scaled weight Wr (out, n): codes (out, n/8) int32 and the sweeps run."""
    rows, n = Wr.shape
    m = n // CODE_DIM
    Q = torch.zeros_like(Wr)  # W_hat / σ
    codes = torch.zeros(rows, m, dtype=torch.int32, device=Wr.device)
    for k in reversed(range(m)):
        c0, c1 = k * CODE_DIM, (k + 1) * CODE_DIM
        target = Wr[:, c0:c1] + (Wr[:, c1:] - Q[:, c1:]) @ L[c1:, c0:c1]
        codes[:, k], Q[:, c0:c1] = e8p_round(target)

    if tune_iters <= 0:
        return codes, 0
    # H_kk^-1 for every diagonal block, (m, 8, 8)
    Hkk = torch.diagonal(Hd.reshape(m, CODE_DIM, m, CODE_DIM), dim1=0, dim2=2).permute(2, 0, 1)
    Hkk_inv = torch.linalg.inv(Hkk.double()).to(Wr.dtype)
    E = Wr - Q  # W - W_hat, kept current block by block
    for sweep in range(tune_iters):
        changed = False
        for k in reversed(range(m)):
            c0, c1 = k * CODE_DIM, (k + 1) * CODE_DIM
            target = Q[:, c0:c1] + (E @ Hd[:, c0:c1]) @ Hkk_inv[k]
            new, Q[:, c0:c1] = e8p_round(target)
            changed |= bool((new != codes[:, k]).any())
            codes[:, k] = new
            E[:, c0:c1] = Wr[:, c0:c1] - Q[:, c0:c1]
        if not changed:
            return codes, sweep + 1
    return codes, tune_iters
