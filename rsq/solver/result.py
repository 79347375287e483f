"""What a solver returns for one weight matrix."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class QuantResult:
    """The quantized form of one linear weight W (out_features, in_features).

    codes: integer codes. Scalar grids: (out, in) uint8 in [0, 2^bits - 1], natural column order.
        e8p: (out, in // 8) int32 holding 16-bit codeword indices.
    scale, zero: (out, n_groups) float32 for scalar grids (zero unused by e8p/nf); e8p: (1, 1) sigma.
    weight: the dequantized weight (out, in), float32, what the fake-quantized model uses.
    loss: the solver's objective, sum_t w_t ||(W_hat - W) x_t||^2 proxy (GPTQ's sum of err^2/d^2/2).
    damp: the damping finally added to the Hessian diagonal (absolute value).
    meta: anything else worth recording (grid kind, bits, group size, perm, retries).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    weight: torch.Tensor
    loss: float
    damp: float = 0.0
    meta: dict = field(default_factory=dict)
    row_loss: torch.Tensor | None = None  # per output row (GPTQ), lets stacked solves be split
