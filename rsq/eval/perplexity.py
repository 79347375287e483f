"""Perplexity on non-overlapping windows (spec §8): PPL = exp(mean over windows of mean token NLL).

The log-likelihood is computed from the decoder's last hidden states, applying the output head to
a few positions at a time, so the (batch, positions, vocabulary) logits are never materialised at
once: with a 152k vocabulary, 4 windows of 512 tokens would otherwise hold 1.2 GB of float32
logits, plus as much again for the log-softmax.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_BATCH = 4
LOGITS_BUDGET = 64 * 1024**2  # bytes of float32 logits per head chunk (log-softmax doubles it)


def positions_per_chunk(batch: int, vocab: int, budget: int = LOGITS_BUDGET) -> int:
    """Positions of ``batch`` windows whose float32 logits fit in ``budget`` bytes (at least 1)."""
    return max(1, budget // max(1, 4 * batch * vocab))


def _split_head(model: nn.Module):
    """(decoder, head) when the model is decoder -> linear output head (Llama/Mistral/Qwen2), else None."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(head, nn.Linear) or decoder is None or decoder is model:
        return None
    return decoder, head


@torch.no_grad()
def window_nll(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = DEFAULT_BATCH,
    progress: Callable[[int, int], None] | None = None,
    logits_budget: int | None = None,
) -> torch.Tensor:
    """Mean next-token NLL of each window (K,), float64. The model is moved to ``device``.
    ``logits_budget``: bytes of float32 logits per head chunk (default LOGITS_BUDGET)."""
    budget = LOGITS_BUDGET if logits_budget is None else logits_budget
    model.to(device)
    split = _split_head(model)
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)
        targets = ids[:, 1:]
        if split is None:  # fallback: the whole logits tensor at once
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.to(logits.device).reshape(-1), reduction="none"
            )
            total = nll.view(ids.shape[0], -1).double().sum(dim=1)
        else:
            decoder, head = split
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
            total = head_nll(hidden, targets, head, budget)
        out.append((total / targets.shape[1]).cpu())
        if progress is not None:
            progress(min(start + batch_size, windows.shape[0]), windows.shape[0])
    return torch.cat(out)


def head_nll(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Linear, budget: int = LOGITS_BUDGET) -> torch.Tensor:
    """Summed next-token NLL per window (B,), float64, from the decoder's normed last hidden states
    (B, T-1, d) and the targets (B, T-1), applying ``head`` to a few positions at a time."""
    step = positions_per_chunk(hidden.shape[0], head.out_features, budget)
    total = torch.zeros(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    for a in range(0, hidden.shape[1], step):
        logits = head(hidden[:, a : a + step]).float()
        # the targets follow the logits: a loader's hooks may return them elsewhere (a compressed-tensors
        # export evaluated on CUDA under transformers 5.17 gave CPU logits; bench/NOTES-checkpoints.md)
        chunk = targets[:, a : a + step].to(logits.device)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk.reshape(-1), reduction="none")
        total += nll.view(hidden.shape[0], -1).double().sum(dim=1).to(total.device)
        del logits, nll
    return total


@torch.no_grad()
def store_nll(model: nn.Module, adapter, store, windows: torch.Tensor, device, batch_size: int) -> torch.Tensor:
    """Mean next-token NLL of each window (K,), float64, from the last decoder layer's outputs in
    ``store`` (rsq.job.stages.EvalPass: a streamed model's windows went through its layers one layer
    at a time): the final norm, then the head a few positions at a time, as :func:`window_nll` does
    after the decoder, with the same batches of ``batch_size`` windows."""
    norm = model.get_submodule(adapter.final_norm)
    head = model.get_submodule(adapter.lm_head)
    homes = [(m, next(m.parameters()).device) for m in (norm, head)]
    for m, _ in homes:
        m.to(device)
    out = []
    try:
        for a, b in store.batches(batch_size):
            hidden = norm(store.get(a, b))[:, :-1]
            targets = windows[a:b].to(device)[:, 1:]
            out.append((head_nll(hidden, targets, head) / targets.shape[1]).cpu())
    finally:
        for m, home in homes:
            m.to(home)
    return torch.cat(out)


def nll_to_perplexity(nll: torch.Tensor) -> float:
    """exp(mean window NLL); NaN when any window's NLL is not finite."""
    if not torch.isfinite(nll).all():
        return float("nan")
    return math.exp(nll.mean().item())


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int = DEFAULT_BATCH,
    progress=None,
) -> float:
    """exp(mean window NLL); NaN when any window's NLL is not finite (callers turn that into an error)."""
    return nll_to_perplexity(window_nll(model, windows, device, batch_size, progress))
