"""NormalFloat-k grids (QLoRA's NF4 generalised to k bits as in lq-lora; spec §6 ``--nf``).

Levels. With δ = 0.9677083 (QLoRA: the mean of 1 - 1/(2·15) and 1 - 1/(2·16)), Φ the standard
normal CDF, N = 2^(k-1) and v(p) = Φ^-1(p) / Φ^-1(δ) (so v(1/2) = 0 and v(δ) = 1):

    positive side: v(1/2 + (δ - 1/2)·i/N)          i = 0..N        (N + 1 levels: 0 .. 1)
    negative side: -v(1/2 + (δ - 1/2)·i/(N - 1))    i = 1..N-1      (N - 1 levels: -1 .. <0)

i.e. quantiles of N(0, 1) at evenly spaced probabilities, normalised to [-1, 1], with an exact
zero and one more positive level than negative ones (2^k levels in all, sorted ascending:
levels[0] = -1, levels[N - 1] = 0, levels[-1] = 1). For k = 4 this is QLoRA's NF4 table.

Scaling is symmetric absmax per row or per group: scale = p·max|w| (levels span [-1, 1]), with
the same MSE clip search as the uniform grid (rsq.quant.grid.find_params): p = 1 - i/clip_grid for
i < clip_grid·max_shrink, keeping per row the p minimising Σ |q(w) - w|^clip_norm (ties keep the
larger p). Rows (groups) that are all zero get scale 1.

Codes are level indices in [0, 2^k - 1] (uint8), so they pack like the uniform grid's codes;
w_hat = scale · levels[code]. Rounding is to the nearest level; a value exactly half-way between
two levels goes to the lower one.
"""

from __future__ import annotations

import functools

import torch

from rsq.config import GridConfig
from rsq.quant.grid import expand_groups

NF_OFFSET = 0.9677083


@functools.lru_cache(maxsize=None)
def _levels64(bits: int) -> torch.Tensor:
    if not 2 <= bits <= 8:
        raise ValueError(f"NormalFloat grids need 2..8 bits, got {bits}")
    n = 1 << (bits - 1)

    def v(p: torch.Tensor) -> torch.Tensor:  # Φ^-1(p) / Φ^-1(δ); the √2 of Φ^-1 cancels
        top = torch.special.erfinv(torch.tensor(2 * NF_OFFSET - 1, dtype=torch.float64))
        return torch.special.erfinv(2 * p - 1) / top

    pos = v(0.5 + (NF_OFFSET - 0.5) * torch.arange(n + 1, dtype=torch.float64) / n)
    neg = -v(0.5 + (NF_OFFSET - 0.5) * torch.arange(1, n, dtype=torch.float64) / (n - 1))
    return torch.cat([neg.flip(0), pos])


def nf_levels(bits: int) -> torch.Tensor:
    """The 2^bits NormalFloat levels, float32, ascending, on the CPU (a fresh copy)."""
    return _levels64(bits).float()


def nf_quantize_codes(w: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest-level index of w / scale (scale broadcasts against w). Returns uint8 codes."""
    levels = levels.to(device=w.device, dtype=torch.float32)
    mid = (levels[1:] + levels[:-1]) / 2
    # number of midpoints strictly below x = index of the nearest level (ties -> lower level)
    return torch.bucketize(w.float() / scale, mid, right=False).to(torch.uint8)


def nf_dequantize(codes: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """w_hat = scale · levels[codes] (float32; scale broadcasts against codes)."""
    return scale * levels.to(device=codes.device, dtype=torch.float32)[codes.long()]


def nf_dequantize_grouped(codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """W_hat (out, in) float32 from level indices (out, in) and per-group scales (out, n_groups)."""
    return nf_dequantize(codes, expand_groups(scale.float(), codes.shape[1]), nf_levels(bits))


def nf_fake_quantize(w: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Quantize then dequantize — what a GPTQ loop writes back for one column:
    ``q = nf_fake_quantize(W1[:, i], scale[:, g], levels)`` with scale (rows, n_groups)."""
    return nf_dequantize(nf_quantize_codes(w, scale, levels), scale, levels)


def _row_params(w: torch.Tensor, cfg: GridConfig, levels: torch.Tensor) -> torch.Tensor:
    """Per-row scale (rows,) for w (rows, cols), all columns forming one group."""
    amax = w.abs().amax(dim=1)
    one = torch.ones_like(amax)
    scale = torch.where(amax == 0, one, amax)
    if cfg.mse_clip:
        best = torch.full_like(amax, float("inf"))
        for i in range(int(cfg.max_shrink * cfg.clip_grid)):
            p = 1 - i / cfg.clip_grid
            s1 = torch.where(amax == 0, one, p * amax)
            err = nf_fake_quantize(w, s1[:, None], levels).sub_(w).abs_().pow_(cfg.clip_norm)
            err = err.sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
    return scale


def nf_find_params(w: torch.Tensor, cfg: GridConfig) -> torch.Tensor:
    """Symmetric absmax scales (rows, n_groups) float32 for w (rows, cols) under cfg
    (bits, group_size, mse_clip, clip_grid, max_shrink, clip_norm); n_groups = 1 per channel."""
    rows, cols = w.shape
    g = cols if cfg.group_size == -1 else cfg.group_size
    cfg.check_width(cols)
    levels = nf_levels(cfg.bits).to(w.device)
    # (rows, cols) -> (rows * n_groups, g): each group of a row is one row of the search
    wg = w.float().reshape(rows * (cols // g), g)
    return _row_params(wg, cfg, levels).reshape(rows, cols // g)


def nf_rtn_quantize(w: torch.Tensor, cfg: GridConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on the NF grid: codes uint8 (rows, cols), scale (rows, n_groups), w_hat."""
    scale = nf_find_params(w, cfg)
    levels = nf_levels(cfg.bits).to(w.device)
    s = expand_groups(scale, w.shape[1])
    codes = nf_quantize_codes(w, s, levels)
    return codes, scale, nf_dequantize(codes, s, levels)
