"""Uniform integer grids: choose scale/zero, quantize to codes, dequantize. Pure tensor functions.

Codes are always *unsigned* integers in [0, 2^bits - 1] with a per-(row, group) zero point, so one
storage layout serves both grids:

* symmetric: zero = 2^(bits-1), scale = clip * max|w| / (2^(bits-1) - 1); the signed levels are
  {-2^(bits-1), ..., 2^(bits-1) - 1} (spec §1, as QuaRot/GPTQ).
* asymmetric: scale = clip * (max - min) / (2^bits - 1), zero = round(-clip*min / scale).

Dequantized value: w_hat = scale * (code - zero).

Shapes: W is (rows, cols); scale and zero are (rows, n_groups) with n_groups = cols // group_size
(1 for per-channel). ``expand_groups`` broadcasts them to (rows, cols).
"""

from __future__ import annotations

import torch

from rsq.config import GridConfig


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``w`` to unsigned codes. scale/zero broadcast against w."""
    return torch.clamp(torch.round(w / scale) + zero, 0, max_code(bits))


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """w_hat = scale * (code - zero), the uniform grid's one formula (scale/zero broadcast)."""
    return scale * (codes - zero)


def dequantize_grouped(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """W_hat (out, in) float32 from codes (out, in) and per-group scale/zero (out, n_groups)."""
    cols = codes.shape[1]
    return dequantize_codes(codes.float(), expand_groups(scale.float(), cols), expand_groups(zero.float(), cols))


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize then dequantize (what GPTQ writes back): dequantize_codes(quantize_codes(...)) op
    for op, computed in place in ``out`` (a buffer of w's shape, reused by the clip search: its
    80 candidates over every weight cost ~2x on CPU with a fresh tensor per op) or a new tensor."""
    out = torch.div(w, scale, out=out)
    return out.round_().add_(zero).clamp_(0, max_code(bits)).sub_(zero).mul_(scale)


def _scale_zero(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool):
    """Scale/zero from per-row ranges (xmin <= 0 <= xmax). Degenerate rows (all zero) get scale 1."""
    if symmetric:
        amax = torch.maximum(xmax, -xmin)
        scale = amax / ((1 << (bits - 1)) - 1)
        scale = torch.where(amax == 0, torch.ones_like(scale), scale)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        span = xmax - xmin
        scale = span / max_code(bits)
        scale = torch.where(span == 0, torch.ones_like(scale), scale)
        zero = torch.round(-xmin / scale)
    return scale, zero


def find_params(w: torch.Tensor, cfg: GridConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero for ``w`` (rows, cols), all columns forming one group.

    With ``cfg.mse_clip`` the range is shrunk by p in {1, 1 - 1/grid, ..., } (grid*max_shrink
    candidates) and, per row, the p minimising sum |fake_quantize(w) - w|^clip_norm is kept (spec §1);
    this torch loop is the reference of the Triton kernel that rsq/formats/uniform.py runs instead
    on CUDA (rsq/kernels/triton_scales.py).
    Returns scale, zero of shape (rows, 1), float32.
    """
    w = w.float()
    zeros = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros)
    xmax = torch.maximum(w.max(dim=1).values, zeros)
    scale, zero = _scale_zero(xmin, xmax, cfg.bits, cfg.symmetric)
    if cfg.mse_clip:
        best = torch.full_like(xmin, float("inf"))
        buf = torch.empty_like(w)
        for i in range(int(cfg.max_shrink * cfg.clip_grid)):
            p = 1 - i / cfg.clip_grid
            s1, z1 = _scale_zero(p * xmin, p * xmax, cfg.bits, cfg.symmetric)
            err = fake_quantize(w, s1[:, None], z1[:, None], cfg.bits, out=buf)
            err = err.sub_(w).abs_().pow_(cfg.clip_norm).sum(dim=1)
            better = err < best
            if better.any():
                best = torch.where(better, err, best)
                scale = torch.where(better, s1, scale)
                zero = torch.where(better, z1, zero)
    return scale[:, None], zero[:, None]


def find_group_params(w: torch.Tensor, cfg: GridConfig, find=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero for every group of ``w``: (rows, n_groups) each. ``find``: the per-row search
    (default :func:`find_params`; the uniform format passes the CUDA kernel's)."""
    rows, cols = w.shape
    g = cols if cfg.group_size == -1 else cfg.group_size
    cfg.check_width(cols)
    # (rows, cols) -> (rows * n_groups, g): each group of a row is one row of the search
    wg = w.float().reshape(rows, cols // g, g).reshape(-1, g)
    scale, zero = (find or find_params)(wg, cfg)
    return scale.reshape(rows, cols // g), zero.reshape(rows, cols // g)


def expand_groups(t: torch.Tensor, cols: int) -> torch.Tensor:
    """(rows, n_groups) -> (rows, cols) by repeating each group's value over its columns."""
    return t.repeat_interleave(cols // t.shape[1], dim=1)


def rtn_quantize(w: torch.Tensor, cfg: GridConfig, find=None):
    """Round-to-nearest with the grid's (clipped) scales. Returns codes, scale, zero, w_hat."""
    scale, zero = find_group_params(w, cfg, find)
    s, z = expand_groups(scale, w.shape[1]), expand_groups(zero, w.shape[1])
    codes = quantize_codes(w.float(), s, z, cfg.bits)
    return codes, scale, zero, dequantize_codes(codes, s, z)
