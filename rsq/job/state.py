"""What the layer loop produces and a resumed run starts from, and the stage clock."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from rsq.solver.result import QuantResult


@dataclass
class LayerReport:
    index: int
    seconds: float
    losses: dict[str, float]
    importance: dict | None = None
    # loss / the module's output energy: 2 loss / tr(W H W^T) (GPTQ), loss / ||W||^2 (RTN)
    rel_losses: dict[str, float] | None = None
    # issue 33: {linear: input statistics (rsq.importance.sites) and whether it was kept unquantized}
    # for each linear that no online rotation reaches and whose input statistics were taken
    sites: dict[str, dict] | None = None


@dataclass
class RunState:
    """What the layer loop hands back, and what a resumed run starts from."""

    results: dict[str, QuantResult] = field(default_factory=dict)  # "model.layers.3.self_attn.q_proj" -> result
    layers: list[LayerReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # stage -> peak GPU memory (GiB) of the run up to the end of that stage's latest turn: the
    # stage where a figure first jumps is the one that raised the peak
    gpu_peaks: dict[str, float] = field(default_factory=dict)
    importance_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> weights of seq 0


@contextmanager
def timed(state: RunState, key: str | None) -> Iterator[None]:
    """Add the wall time of the block to state.timings[key] (and the run's GPU peak so far to
    state.gpu_peaks[key]); ``key`` None times nothing. On CUDA the queue is drained at both ends,
    so a stage is billed for its own kernels, not for the asynchronous work of the stage before it
    (the first host sync would otherwise absorb it; measured stage splits were wrong without this)."""
    if key is None:
        yield
        return
    sync()
    t0 = time.perf_counter()
    try:
        # a named range for torch.profiler (bench/quantize_speed.py --profile sums device time per stage)
        with torch.profiler.record_function(f"rsq:{key}"):
            yield
    finally:
        sync()
        state.timings[key] = state.timings.get(key, 0.0) + time.perf_counter() - t0
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state.gpu_peaks[key] = torch.cuda.max_memory_allocated() / 1024**3


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
