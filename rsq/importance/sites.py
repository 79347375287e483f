"""Massive activations at a linear's input, and the sites that quantize badly without a rotation (issue 33).

Where no online rotation reaches a linear's input (the ``down_proj`` under ``--online-rotations
none``), a few calibration tokens (the attention sinks) can carry a *massive activation*: one input
channel whose value is 10^2-10^4 times the typical channel's. GPTQ quantizes the weight column of
that channel per output row and can push its rounding error only onto the other columns, which
those tokens barely use, so the error on the sink tokens' outputs stays; on a Qwen2-family model the
relative loss of such a ``down_proj`` is 0.1-0.14 against ~1e-4 with the rotation (bench/
NOTES-importance.md). ``--unrotated-outliers keep-float`` keeps those few modules unquantized.

The statistic (:class:`InputStats`, accumulated over every calibration token of the module's input):

    channel_peak = max_j a_j / median_j a_j,   a_j = max_t |x_tj|

one channel's peak against the typical channel's peak. It is not rotation-invariant on purpose: a
rotation spreads a massive channel over all channels (that is why the rotated site is harmless), and
``token_norm`` = max_t ||x_t|| / median_t ||x_t||, recorded beside it, is the same with or without
the rotation. The threshold (``ImportanceConfig.outlier_ratio``) comes from the measured values of
both models (bench/NOTES-importance.md, Session 12).

The statistic is a necessary sign, not a sufficient one: SmolLM2's layer-11 ``down_proj`` has the
largest channel peak of both models (2331x) and quantizes well. ``--unrotated-outliers
keep-float-on-loss`` decides from the quantization itself instead: the unrotated ``down_proj`` is
quantized, and if its relative GPTQ loss exceeds ``ImportanceConfig.outlier_loss_ratio`` times the
largest relative loss of the same layer's other linears (quantized just before it, same grid), its
float weights are put back before the layer's outputs are propagated (rsq/job/stages.py). ``auto``
(the default) is that rule for rotated runs under ``--online-rotations none`` and ``off`` elsewhere
(:func:`rsq.config.resolve_unrotated_outliers`).
"""

from __future__ import annotations

import torch

KEEP_FLOAT = "keep-float"
KEEP_FLOAT_ON_LOSS = "keep-float-on-loss"


class InputStats:
    """Running per-channel peaks and per-token norms of a linear's input over batches."""

    def __init__(self) -> None:
        self.peak: torch.Tensor | None = None  # (d,) max_t |x_tj|, float32
        self.norms: list[torch.Tensor] = []  # per batch: (B*T,) token norms, float32

    def add(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        peak = flat.abs().amax(dim=0)
        self.peak = peak if self.peak is None else torch.maximum(self.peak, peak)
        self.norms.append(flat.norm(dim=1).cpu())

    def summary(self) -> dict:
        """channel_peak, token_norm (ratios as above, float) and channel (the argmax j of a_j)."""
        if self.peak is None:
            raise RuntimeError("no input reached the statistics")
        peak = self.peak.cpu()
        norms = torch.cat(self.norms)
        return {
            "channel_peak": _ratio(peak.max(), peak.median()),
            "token_norm": _ratio(norms.max(), norms.median()),
            "channel": int(peak.argmax()),
        }


def _ratio(top: torch.Tensor, mid: torch.Tensor) -> float:
    mid = float(mid)
    return float(top) / mid if mid > 0 else float("inf")
