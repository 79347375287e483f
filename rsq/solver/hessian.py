"""Streaming accumulation of the importance-weighted GPTQ Hessian (spec §4).

H = (2/N) * sum_seq sum_t w_t x_t x_t^T, where N counts sequences and the per-token weights w of
each sequence have mean 1 (so every sequence carries the same total weight). Features are scaled by
sqrt(w_t) before the outer product. Accumulated in float32 (or float64 if asked).
"""

from __future__ import annotations

import torch


class HessianAccumulator:
    """Accumulates sum_t w_t x_t x_t^T over batches of sequences.

    add(x, weights): x is (B, T, d) (or (T, d) for one sequence), weights (B, T) or None (= all
    ones). With weights None or exactly one, the result is bit-identical to plain GPTQ's.
    """

    def __init__(self, width: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.width = width
        self.dtype = dtype
        self.sum = torch.zeros(width, width, device=device, dtype=dtype)
        self.nseq = 0

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        if x.dim() == 2:
            x = x.unsqueeze(0)
            weights = None if weights is None else weights.unsqueeze(0)
        batch = x.shape[0]
        x = x.reshape(batch, -1, x.shape[-1]).to(self.sum.device, self.dtype)
        if weights is not None:
            # sqrt(w) on the features: H gains w_t x_t x_t^T (sqrt(1) == 1 exactly)
            x = x * weights.to(self.sum.device, self.dtype).sqrt().reshape(batch, -1, 1)
        flat = x.reshape(-1, self.width)  # (B*T, d)
        self.sum.addmm_(flat.T, flat)
        self.nseq += batch

    def merge(self, other: "HessianAccumulator") -> None:
        self.sum += other.sum.to(self.sum.device)
        self.nseq += other.nseq

    def finalize(self) -> torch.Tensor:
        """(2/N) * sum, float32."""
        if self.nseq == 0:
            raise RuntimeError("no calibration data reached this module")
        return (self.sum * (2.0 / self.nseq)).float()
