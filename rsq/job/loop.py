"""The only loop over decoder layers.

    for each layer i:  weights.fetch(i) -> stages (rotate, restore, quantize, propagate, eval)
                       -> store.finish(i) -> weights.release(i)
    then               store.drain() (the finished layers' files are on disk)
    finally            stages, weight source and store closed (nothing left in flight)

The weight source may read layer i + 1 on a background thread during layer i's turn and the store
may write layer i's files on another while layer i + 1 is worked on (rsq.io.streaming,
rsq.job.store); the time the loop waits on each is its own stage ("io_wait_read", "io_wait_write"),
and the layer's copies to the compute device and back are "layer_copy".

Everything a mode changes is a collaborator chosen before the first layer (rsq.job.run): where the
weights live (:mod:`rsq.job.weights`: in memory, or streamed from safetensors files), what is
done to each layer (:mod:`rsq.job.stages`), and what is kept on disk (:mod:`rsq.job.store`: resume
state, shards, results). A resumed run's finished layers go through this same loop.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from rsq.config import RSQConfig
from rsq.distributed import DistContext
from rsq.job.stages import Calibration, EvalPass, Propagate, QuantizeLayer, RotateLayers, Stage
from rsq.job.state import LayerReport, RunState, sync, timed
from rsq.job.weights import InMemoryWeights, WeightSource
from rsq.models.adapter import ModelAdapter
from rsq.models.device import resolve_device
from rsq.models.registry import resolve

__all__ = ["EvalPass", "LayerReport", "RunState", "quantize_layers", "run_layers"]


class NoStore:
    """A run store that keeps nothing (rsq.job.store.RunStore keeps a job's files)."""

    def finish(self, index: int, state: RunState) -> None:
        pass

    def release(self, index: int, state: RunState) -> None:
        pass

    def drain(self, state: RunState | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def run_layers(
    model: nn.Module,
    adapter: ModelAdapter,
    weights: WeightSource,
    stages: list[Stage],
    store,
    state: RunState,
    device: torch.device,
    progress: Callable[[int, int, str], None] | None = None,
) -> RunState:
    """Run every decoder layer of ``model`` through ``stages`` on ``device``, in place.
    ``store.finish(i, state)`` follows each layer that a stage reported on (quantized in this
    session); ``progress(done, total, what)`` after each layer."""
    layers = adapter.get_layers(model)
    try:
        for stage in stages:
            stage.prepare(model)
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            with timed(state, weights.timing_key):
                weights.fetch(i, layer)
            home = next(layer.parameters()).device  # where the layer lives between its turns
            with timed(state, "layer_copy"):
                layer.to(device, non_blocking=True)  # from pinned memory (a prefetched layer): asynchronous
            reports = [stage(i, layer) for stage in stages]
            with timed(state, "layer_copy"):
                layer.to(home, non_blocking=True)  # to pinned host memory, asynchronously, from a GPU
                sync()  # the layer's codes and weights have reached the host
            report = next((r for r in reports if r is not None), None)
            if report is not None:
                report.seconds = time.perf_counter() - t0
                state.layers.append(report)
                store.finish(i, state)
            store.release(i, state)
            weights.release(i, layer)
            if progress is not None:
                progress(i + 1, len(layers), f"layer {i}")
        store.drain(state)
    finally:
        sync()
        for stage in stages:
            stage.close()
        weights.close()
        store.close()
    return state


def quantize_layers(
    model: nn.Module,
    cfg: RSQConfig,
    windows: torch.Tensor,
    *,
    adapter: ModelAdapter | None = None,
    weight_fn: Callable | None = None,
    rotation=None,
    progress: Callable[[int, int, str], None] | None = None,
    dist_ctx: DistContext | None = None,
) -> RunState:
    """Quantize every decoder layer of an in-memory ``model`` in place (fake quantization: W <- W_hat),
    keeping nothing on disk: the loop with the quantize stages alone (rsq.job.run builds a job's).

    windows: (N, T) calibration token ids. ``weight_fn(layer_index, layer, x, kwargs, ids)``
    returns per-token weights (B, T) or None for uniform (rsq.importance). ``rotation``: a
    :class:`rsq.rotation.rotate.RotationPlan` applied on the way. ``dist_ctx``: with several ranks,
    this rank handles windows rank, rank+K, ... and Hessians are summed over ranks."""
    cfg = cfg.resolved()  # "auto" choices made once (e.g. --unrotated-weights)
    adapter = adapter or resolve(model)  # public API: a caller with a bare model has its family looked up
    ctx = dist_ctx or DistContext()
    state = RunState()
    calib = Calibration(cfg, windows, adapter, ctx, model)
    stages: list[Stage] = []
    if rotation is not None:
        stages.append(RotateLayers(rotation, adapter, resolve_device(cfg.device), state))
    stages += [QuantizeLayer(calib, state, ctx, weight_fn), Propagate(calib, state)]
    device = resolve_device(cfg.device)
    return run_layers(model, adapter, InMemoryWeights(), stages, NoStore(), state, device, progress)
