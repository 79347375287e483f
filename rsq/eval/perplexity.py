"""Perplexity on non-overlapping windows (spec §8): PPL = exp(mean over windows of mean token NLL)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@torch.no_grad()
def window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Mean next-token NLL of each window (K,), float64. The model is moved to ``device``."""
    model.to(device)
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        out.append(nll.view(ids.shape[0], -1).mean(dim=1).double().cpu())
        if progress is not None:
            progress(min(start + batch_size, windows.shape[0]), windows.shape[0])
    return torch.cat(out)


def perplexity(
    model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 4, progress=None
) -> float:
    nll = window_nll(model, windows, device, batch_size, progress)
    if not torch.isfinite(nll).all():
        return float("nan")
    return math.exp(nll.mean().item())
