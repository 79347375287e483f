"""GPTQ (Frantar et al. 2022) as a pure function of (W, H, config). No model in sight.

Minimises, column by column, the layer-output error tr((W_hat - W) H (W_hat - W)^T) where H is the
(importance-weighted, spec §4) input Hessian, compensating each column's rounding error on the
columns not yet quantized through the upper Cholesky factor of H^-1.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from rsq.config import GridConfig, SolverConfig
from rsq.errors import SingularHessianError
from rsq.quant.grid import dequantize_codes, find_group_params, find_params, quantize_codes, rtn_quantize
from rsq.solver.result import QuantResult

log = logging.getLogger(__name__)


def prepare_hessian(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead columns (diag H == 0, an input never active) get H_jj = 1 and W[:, j] = 0 (spec §4.1).

    Returns float32 copies; the inputs are not modified.
    """
    W = W.float().clone()
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


def damped_inverse_cholesky(H: torch.Tensor, damp_frac: float, retries: int, name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1, i.e. (H + damp I)^-1 = U^T U.

    damp = damp_frac * mean(diag H). If a factorisation fails, another damp is added to the
    *original* H (cumulative: k+1 dampings on try k) — never to a partial factor — at most
    ``retries`` times; then SingularHessianError. Returns (U, absolute damp used).
    """
    mean_diag = torch.mean(torch.diag(H)).item()
    if not torch.isfinite(H).all():
        raise SingularHessianError(
            f"the Hessian of {name or 'a module'} contains NaN/Inf: the calibration activations "
            "overflowed; use --dtype float32 or check the model weights"
        )
    step = damp_frac * mean_diag if mean_diag > 0 else 1e-6
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    for attempt in range(retries + 1):
        damp = step * (attempt + 1) if damp_frac > 0 or attempt else 0.0
        try:
            L = torch.linalg.cholesky(H + damp * eye)
            Hinv = torch.cholesky_inverse(L)
            U = torch.linalg.cholesky(Hinv, upper=True)
            if torch.isfinite(U).all():
                if attempt:
                    log.warning("%s: Hessian needed %d dampings of %.3g", name or "module", attempt + 1, step)
                return U, damp
        except torch.linalg.LinAlgError:
            pass
    raise SingularHessianError(
        f"the Hessian of {name or 'a module'} (width {H.shape[0]}) is not positive definite even after "
        f"{retries + 1} dampings of {damp_frac:.3g}*mean(diag H): use more calibration samples "
        "(--nsamples) or a larger damping"
    )


class _ScalarGrid:
    """The two operations GPTQ needs from a per-element grid: row parameters for a block of columns,
    and rounding one column. Uniform: codes with zero points; nf: NormalFloat level indices."""

    def __init__(self, grid: GridConfig, device: torch.device):
        self.grid = grid
        if grid.kind == "nf":
            from rsq.quant.nf import nf_levels

            self.levels = nf_levels(grid.bits).to(device)

    def params(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, 1) scale and zero for the columns of W taken as one group."""
        if self.grid.kind == "nf":
            from rsq.quant.nf import nf_find_params

            scale = nf_find_params(W, replace(self.grid, group_size=-1))
            return scale, torch.zeros_like(scale)
        return find_params(W, self.grid)

    def group_params(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grid.kind == "nf":
            from rsq.quant.nf import nf_find_params

            scale = nf_find_params(W, self.grid)
            return scale, torch.zeros_like(scale)
        return find_group_params(W, self.grid)

    def round(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.grid.kind == "nf":
            from rsq.quant.nf import nf_dequantize, nf_quantize_codes

            c = nf_quantize_codes(w, s, self.levels)
            return c.float(), nf_dequantize(c, s, self.levels)
        c = quantize_codes(w, s, z, self.grid.bits)
        return c, dequantize_codes(c, s, z)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: GridConfig,
    solver: SolverConfig,
    name: str = "",
) -> QuantResult:
    """Quantize W (out, in) against Hessian H (in, in) with GPTQ.

    grid: bits, symmetric, group_size, MSE clip (scales are fixed once per row from the original W
        for per-channel grids, spec §4.5; per group they are found at each group's first column on
        the error-updated W, as GPTQ does). With act_order, columns are visited by decreasing
        diag(H) and group parameters are computed up front from the original W in natural order
        ("static groups"), so codes, scales and zeros stay in natural column order.
    solver: block_size, damp_frac, act_order, damp_retries.
    Grids: uniform (codes with zero points) and nf (NormalFloat level indices, zero unused).
    Returns codes in natural column order, scale/zero (out, n_groups), W_hat and the GPTQ loss
    sum_j (w_j - q_j)^2 / U_jj^2 / 2 (which equals half the layer-output error increase).
    """
    grid.check_width(W.shape[1], name)
    rows, cols = W.shape
    W, H = prepare_hessian(W, H)
    group = cols if grid.group_size == -1 else grid.group_size
    ops = _ScalarGrid(grid, W.device)
    static = grid.group_size == -1 or solver.act_order
    if static:
        scale_g, zero_g = ops.group_params(W) if grid.group_size != -1 else ops.params(W)
    else:
        scale_g = torch.empty(rows, cols // group, device=W.device)
        zero_g = torch.empty_like(scale_g)

    perm = None
    if solver.act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    U, damp = damped_inverse_cholesky(H, solver.damp_frac, solver.damp_retries, name)
    del H

    codes = torch.zeros(rows, cols, device=W.device)
    Q = torch.zeros_like(W)
    losses = torch.zeros(rows, device=W.device)
    col_of = perm if perm is not None else torch.arange(cols, device=W.device)
    group_of = (col_of // group).tolist()

    for i1 in range(0, cols, solver.block_size):
        i2 = min(i1 + solver.block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = group_of[j]
            if not static and col_of[j] % group == 0:
                # new group: parameters from W after the updates of earlier blocks (as IST GPTQ;
                # with group_size == block_size a group starts a block, so this is exact)
                s, z = ops.params(W[:, j : j + group])
                scale_g[:, g], zero_g[:, g] = s[:, 0], z[:, 0]
            s, z = scale_g[:, g], zero_g[:, g]
            w = W1[:, i]
            c, q = ops.round(w, s, z)
            codes[:, j], Q[:, j] = c, q
            d = U1[i, i]
            losses += (w - q) ** 2 / d**2 / 2
            err = (w - q) / d
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    if perm is not None:
        inv = torch.argsort(perm)
        codes, Q = codes[:, inv], Q[:, inv]
    return QuantResult(
        codes=codes.to(torch.uint8),
        scale=scale_g,
        zero=zero_g,
        weight=Q,
        loss=losses.sum().item(),
        damp=damp,
        meta={"algorithm": "gptq", "act_order": solver.act_order},
        row_loss=losses,
    )


def split_rows(res: QuantResult, sizes: list[int]) -> list[QuantResult]:
    """Split a result of vertically stacked matrices (sharing one Hessian) back into per-matrix
    results; GPTQ treats rows independently, so each part is that matrix's own solution."""
    parts = []
    for codes, scale, zero, weight, rl in zip(*(torch.split(t, sizes) for t in (res.codes, res.scale, res.zero,
                                                                              res.weight, res.row_loss))):
        parts.append(QuantResult(codes=codes, scale=scale, zero=zero, weight=weight, loss=rl.sum().item(),
                                 damp=res.damp, meta=dict(res.meta), row_loss=rl))
    return parts


def rtn_result(W: torch.Tensor, grid: GridConfig, name: str = "") -> QuantResult:
    """Round-to-nearest as a QuantResult (loss = plain squared weight error)."""
    grid.check_width(W.shape[1], name)
    if grid.kind == "nf":
        from rsq.quant.nf import nf_rtn_quantize

        codes, scale, w_hat = nf_rtn_quantize(W.float(), grid)
        zero = torch.zeros_like(scale)
    else:
        codes, scale, zero, w_hat = rtn_quantize(W.float(), grid)
    return QuantResult(
        codes=codes.to(torch.uint8),
        scale=scale,
        zero=zero,
        weight=w_hat,
        loss=((w_hat - W.float()) ** 2).sum().item(),
        meta={"algorithm": "rtn"},
    )


def layer_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """tr((W_hat - W) H (W_hat - W)^T): the output error the Hessian measures."""
    D = (W_hat - W).double()
    return torch.einsum("ij,jk,ik->", D, H.double(), D).item()
