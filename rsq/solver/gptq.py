"""GPTQ (Frantar et al. 2022) as a pure function of (W, H, config). No model in sight.

Minimises, column by column, the layer-output error tr((W_hat - W) H (W_hat - W)^T) where H is the
(importance-weighted, spec §4) input Hessian, compensating each column's rounding error on the
columns not yet quantized through the upper Cholesky factor of H^-1.
"""

from __future__ import annotations

import logging

import torch

from rsq.config import GridConfig, SolverConfig
from rsq.errors import SingularHessianError
from rsq.formats import ScalarOps
from rsq.kernels import has_triton
from rsq.quant.grid import max_code
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


def damped_inverse_cholesky(
    H: torch.Tensor, damp_frac: float, retries: int, name: str = ""
) -> tuple[torch.Tensor, float]:
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
        # One factorisation instead of cholesky -> cholesky_inverse -> cholesky (a third of the
        # flops): with J the order-reversing permutation and J (H + damp I) J = L Lᵀ,
        # (H + damp I)^-1 = Uᵀ U for U = J L^-1 J, which is upper triangular with a positive
        # diagonal, i.e. the upper Cholesky factor of the inverse (unique).
        L, info = torch.linalg.cholesky_ex((H + damp * eye).flip(0, 1))
        if info.item() == 0:
            U = torch.linalg.solve_triangular(L, eye, upper=False).flip(0, 1)
            if torch.isfinite(U).all():
                if attempt:
                    log.warning("%s: Hessian needed %d dampings of %.3g", name or "module", attempt + 1, step)
                return U, damp
    raise SingularHessianError(
        f"the Hessian of {name or 'a module'} (width {H.shape[0]}) is not positive definite even after "
        f"{retries + 1} dampings of {damp_frac:.3g}*mean(diag H): use more calibration samples "
        "(--nsamples) or a larger damping"
    )


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    grid: GridConfig,
    solver: SolverConfig,
    name: str = "",
    kernels: str = "auto",
) -> QuantResult:
    """Quantize W (out, in) against Hessian H (in, in) with GPTQ.

    grid: bits, symmetric, group_size, MSE clip (scales are fixed once per row from the original W
        for per-channel grids, spec §4.5; per group they are found at each group's first column on
        the error-updated W, as GPTQ does). With act_order, columns are visited by decreasing
        diag(H) and group parameters are computed up front from the original W in natural order
        ("static groups"), so codes, scales and zeros stay in natural column order.
    solver: block_size, damp_frac, act_order, damp_retries, inner_block, cuda_graphs.
    Grids: any format whose solver is GPTQ (rsq/formats/: uniform codes with zero points, nf
    NormalFloat level indices with zero unused); its ScalarOps give parameters and rounding.
    kernels: "auto" runs the CUDA Triton kernels where they apply (clip search, sub-block loop);
    "reference" the torch code everywhere (the kernels' oracle).
    Returns codes in natural column order, scale/zero (out, n_groups), W_hat and the GPTQ loss
    sum_j (w_j - q_j)^2 / U_jj^2 / 2 (which equals half the layer-output error increase).
    """
    grid.check_width(W.shape[1], name)
    rows, cols = W.shape
    W, H = prepare_hessian(W, H)
    group = cols if grid.group_size == -1 else grid.group_size
    ops = grid.format.ops(grid, W.device, kernels)
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
    col_of = (perm if perm is not None else torch.arange(cols)).tolist()
    group_of = [c // group for c in col_of]
    bs = solver.block_size

    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        if not static:
            for j in range(i1, i2):
                if col_of[j] % group == 0:
                    # new group: parameters from W after the updates of earlier blocks (as IST
                    # GPTQ, which reads W, not the in-block copy)
                    s_, z_ = ops.params(W[:, j : j + group])
                    scale_g[:, group_of[j]], zero_g[:, group_of[j]] = s_[:, 0], z_[:, 0]
        idx = group_of[i1:i2]
        if static and grid.group_size == -1:
            S1, Z1 = scale_g.expand(rows, i2 - i1), zero_g.expand(rows, i2 - i1)
        else:
            S1, Z1 = scale_g[:, idx], zero_g[:, idx]
        inner = solver.inner_block
        block = _block_runner(ops, inner, rows, i2 - i1, W.device) if W.is_cuda and solver.cuda_graphs else _gptq_block
        C1, Q1, E1, L1 = block(ops, inner, W[:, i1:i2], U[i1:i2, i1:i2], S1, Z1)
        codes[:, i1:i2], Q[:, i1:i2] = C1, Q1
        losses += L1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

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


def _gptq_block(ops: ScalarOps, inner: int, W1: torch.Tensor, U1: torch.Tensor, S1: torch.Tensor, Z1: torch.Tensor):
    """One GPTQ block, column by column: quantize, then push the error onto the block's later
    columns through the Cholesky row. W1, S1, Z1: (rows, B); U1: (B, B). Returns codes, W_hat,
    scaled errors (for the lazy update of later blocks) and per-row losses.

    The same lazy-batch identity GPTQ uses between blocks is applied inside the block: a column's
    error goes at once only to the rest of its ``inner``-column sub-block (SolverConfig.inner_block),
    and each finished sub-block
    reaches the block's later columns in one (rows, inner) x (inner, rest) product. Exact
    arithmetic gives the same W_hat; the per-column traffic drops from rows x (B - i) to
    rows x inner (~20% faster on CPU; no change measured on the H100, bench/NOTES-speed.md). On
    CUDA, for a format whose ops declare it and ops.kernels == "auto", the sub-block's column loop
    is one Triton kernel (rsq/kernels/triton_gptq.py)."""
    W1 = W1.clone()
    U1 = U1.contiguous()  # the same operand layout as the graphed copy, so cuBLAS rounds the same way
    B = W1.shape[1]
    C1, Q1, E1 = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
    L1 = torch.zeros(W1.shape[0], device=W1.device, dtype=W1.dtype)
    fused = ops.fused_gptq and ops.kernels == "auto" and W1.is_cuda and inner <= 16 and has_triton()
    for j1 in range(0, B, inner):
        j2 = min(j1 + inner, B)
        if fused:
            from rsq.kernels.triton_gptq import sub_block

            sl = slice(j1, j2)
            sub_block(
                W1[:, sl],
                U1[sl, sl],
                S1[:, sl],
                Z1[:, sl],
                C1[:, sl],
                Q1[:, sl],
                E1[:, sl],
                L1,
                max_code(ops.grid.bits),
            )
        elif not W1.is_cuda:
            C1[:, j1:j2], Q1[:, j1:j2], E1[:, j1:j2] = _sub_block_rows(ops, W1, U1, S1, Z1, L1, j1, j2)
        else:  # column by column (the graphed path captures this form)
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


def _sub_block_rows(ops: ScalarOps, W1, U1, S1, Z1, L1, j1: int, j2: int):
    """Columns j1..j2 of a CPU block as _gptq_block's column loop computes them, on the transposed
    sub-block so that each column is a contiguous row: the same elementwise operations on the same
    values (identical results, tests/unit/test_gptq.py), ~1.7x faster on CPU, where each of a
    column's ~15 small ops otherwise touches one cache line per row. Returns the sub-block's
    (codes, W_hat, errors), (rows, j2 - j1); adds the losses to L1 in place."""
    Wt, St, Zt = (t[:, j1:j2].T.contiguous() for t in (W1, S1, Z1))
    Ct, Qt, Et = torch.empty_like(Wt), torch.empty_like(Wt), torch.empty_like(Wt)
    for i in range(j2 - j1):
        w = Wt[i]
        c, q = ops.round(w, St[i], Zt[i])
        Ct[i], Qt[i] = c, q
        err = (w - q) / U1[j1 + i, j1 + i]
        L1 += err * err / 2
        Wt[i:] -= U1[j1 + i, j1 + i : j2][:, None] * err[None, :]
        Et[i] = err
    return Ct.T, Qt.T, Et.T


class _GraphedBlock:
    """_gptq_block captured once as a CUDA graph for a (rows, B, grid) shape and replayed for every
    block of every matrix of that shape: ~12 kernels x B columns become one launch, which removes
    the launch/dispatch overhead that dominates GPTQ on a GPU."""

    def __init__(self, ops: ScalarOps, inner: int, rows: int, width: int, device: torch.device):
        self.ops = ops  # the graph reads ops' tensors (NF levels): keep them alive
        self.W1 = torch.zeros(rows, width, device=device)
        self.U1 = torch.eye(width, device=device)
        self.S1 = torch.ones(rows, width, device=device)
        self.Z1 = torch.zeros(rows, width, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture, as CUDA graphs require
            _gptq_block(ops, inner, self.W1, self.U1, self.S1, self.Z1)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = _gptq_block(ops, inner, self.W1, self.U1, self.S1, self.Z1)

    def __call__(self, ops, inner, W1, U1, S1, Z1):
        self.W1.copy_(W1)
        self.U1.copy_(U1)
        self.S1.copy_(S1)
        self.Z1.copy_(Z1)
        self.graph.replay()
        return tuple(t.clone() for t in self.out)


# A cache, not a switch: captured graphs keyed by everything the capture depends on (shapes repeat
# for every layer of a model, so each is captured once per process).
_GRAPH_CACHE: dict = {}


def _block_runner(ops: ScalarOps, inner: int, rows: int, width: int, device: torch.device):
    key = (str(device), rows, width, ops.grid.kind, ops.grid.bits, ops.kernels, inner)
    if key not in _GRAPH_CACHE:
        _GRAPH_CACHE[key] = _GraphedBlock(ops, inner, rows, width, device)
    return _GRAPH_CACHE[key]


def split_rows(res: QuantResult, sizes: list[int]) -> list[QuantResult]:
    """Split a result of vertically stacked matrices (sharing one Hessian) back into per-matrix
    results; GPTQ treats rows independently, so each part is that matrix's own solution."""
    parts = []
    for codes, scale, zero, weight, rl in zip(
        *(torch.split(t, sizes) for t in (res.codes, res.scale, res.zero, res.weight, res.row_loss))
    ):
        parts.append(
            QuantResult(
                codes=codes,
                scale=scale,
                zero=zero,
                weight=weight,
                loss=rl.sum().item(),
                damp=res.damp,
                meta=dict(res.meta),
                row_loss=rl,
            )
        )
    return parts


def rtn_result(W: torch.Tensor, grid: GridConfig, name: str = "", kernels: str = "auto") -> QuantResult:
    """Round-to-nearest on the grid's format as a QuantResult (loss = plain squared weight error)."""
    fmt = grid.format
    fmt.check_width(grid, W.shape[1], name)
    codes, scale, zero, w_hat = fmt.rtn(W.float(), grid, kernels)
    if codes.is_floating_point():
        codes = codes.to(torch.uint8)  # scalar grids: integral float codes -> the solvers' uint8
    return QuantResult(
        codes=codes,
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
