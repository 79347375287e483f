"""Orchestration: the only module that loops over decoder layers.

load -> (fuse + rotate) -> capture layer-0 inputs -> for each layer: importance -> Hessians per
sequential group -> solve -> write back -> propagate -> results. Numerics live in rsq.solver,
rsq.quant, rsq.importance and rsq.rotation; architecture knowledge in rsq.models.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from rsq.calib.blockpass import LayerPasses
from rsq.calib.capture import (
    ActivationStore,
    capture_layer0_inputs,
    choose_location,
    layer_forward,
)
from rsq.checkpoint.schema import dequantize_result
from rsq.config import RSQConfig
from rsq.distributed import DistContext
from rsq.errors import CalibrationError, ConfigError
from rsq.models.adapter import ModelAdapter
from rsq.models.registry import resolve
from rsq.solver.gptq import gptq_quantize, rtn_result, split_rows
from rsq.solver.hessian import HessianAccumulator
from rsq.solver.result import QuantResult

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    index: int
    seconds: float
    losses: dict[str, float]
    importance: dict | None = None
    # loss / the module's output energy: 2 loss / tr(W H W^T) (GPTQ), loss / ||W||^2 (RTN)
    rel_losses: dict[str, float] | None = None


@dataclass
class RunState:
    """What the pipeline hands back, and what a resumed run starts from."""

    results: dict[str, QuantResult] = field(default_factory=dict)  # "model.layers.3.self_attn.q_proj" -> result
    layers: list[LayerReport] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    # stage -> peak GPU memory (GiB) of the run up to the end of that stage's latest turn: the
    # stage where a figure first jumps is the one that raised the peak
    gpu_peaks: dict[str, float] = field(default_factory=dict)
    importance_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> weights of seq 0


@dataclass
class EvalPass:
    """Evaluation windows carried through the layer loop beside the calibration activations (a
    streamed model has each layer only during its turn): after layer i is quantized, its output
    for these windows is computed with the quantized weights, ``batch_size`` windows per forward as
    rsq.eval.perplexity batches them. ``store`` holds the last layer's output at the end."""

    windows: torch.Tensor  # (K, T) token ids
    batch_size: int
    store: ActivationStore | None = None
    kwargs: dict | None = None


_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def resolve_device(name: str) -> torch.device:
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ConfigError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CalibrationError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible: use cuda:0.."
            f"{torch.cuda.device_count() - 1}"
        )
    return torch.device(name)


@contextmanager
def _timed(state: RunState, key: str) -> Iterator[None]:
    """Add the wall time of the block to state.timings[key] (and the run's GPU peak so far to
    state.gpu_peaks[key]). On CUDA the queue is drained at both ends, so a stage is billed for its
    own kernels, not for the asynchronous work of the stage before it (the first host sync would
    otherwise absorb it; measured stage splits were wrong without this)."""
    _sync()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _sync()
        state.timings[key] = state.timings.get(key, 0.0) + time.perf_counter() - t0
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state.gpu_peaks[key] = torch.cuda.max_memory_allocated() / 1024**3


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def quantize_layers(
    model: nn.Module,
    cfg: RSQConfig,
    windows: torch.Tensor,
    *,
    adapter: ModelAdapter | None = None,
    state: RunState | None = None,
    start_layer: int = 0,
    on_layer_done: Callable[[int, RunState], None] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    weight_fn: Callable | None = None,
    dist_ctx: DistContext | None = None,
    rotation=None,
    streamer=None,
    evals: list[EvalPass] | None = None,
) -> RunState:
    """Quantize every decoder layer of ``model`` in place (fake quantization: W <- W_hat).

    windows: (N, T) calibration token ids. Layers < start_layer must already hold their quantized
    weights (resume); they are only run forward. ``weight_fn(layer_index, layer, x, kwargs, ids)``
    returns per-token weights (B, T) or None for uniform (the importance step; see rsq.importance).
    ``on_layer_done`` is called after each finished layer (used for resume state).
    ``dist_ctx``: with several ranks, this rank handles windows rank, rank+K, ... and Hessians are
    summed over ranks before the solves (rsq.distributed).
    ``rotation``: a :class:`rsq.rotation.rotate.RotationPlan` to apply on the way — the model's
    ends before the capture, each layer on the device at its turn — instead of a whole-model pass
    on the host first. Finished layers (resume) are rotated too, then get their W_hat from
    ``state.results``.
    ``streamer``: a :class:`rsq.streaming.LayerStreamer` for a model whose layers are on ``meta``:
    layer i is fetched just before its turn and released after it (and after ``on_layer_done``).
    ``evals``: windows whose hidden states follow the quantized layers (:class:`EvalPass`).
    """
    adapter = adapter or resolve(model)
    state = state or RunState()
    ctx = dist_ctx or DistContext()
    device = resolve_device(cfg.device)
    dtype = next(model.parameters()).dtype
    layers = adapter.get_layers(model)
    n_total = windows.shape[0] * cfg.importance.expand
    local = ctx.shard(n_total)
    n_seq = len(local)
    seqlen = windows.shape[1]
    hidden = model.config.hidden_size
    global_fn = _window_fn(windows, cfg.importance.expand)
    window_fn = lambda i: global_fn(local[i])  # noqa: E731
    location = choose_location(
        cfg.offload if cfg.importance.expand == 1 or cfg.offload != "auto" else "disk",
        n_seq,
        seqlen,
        hidden,
        dtype,
        device,
    )
    store = ActivationStore(n_seq, seqlen, hidden, dtype, device, location)
    bs = cfg.batch_size
    cache = None
    try:
        if rotation is not None:
            from rsq.rotation.rotate import rotate_ends

            with _timed(state, "rotate"):
                rotate_ends(model, adapter, rotation, device)
        # every layer finished before (a resumed streamed run): only the evaluation windows need them;
        # round-to-nearest without importance weights reads no activation: none are computed
        replay = start_layer >= len(layers) or (cfg.solver.algorithm == "rtn" and weight_fn is None)
        kwargs = {}
        if not replay:
            with _timed(state, "capture"):
                kwargs = capture_layer0_inputs(model, layers, windows, store, bs, device, window_fn)
        for ev in evals or ():
            with _timed(state, "eval_capture"):
                k, t = ev.windows.shape
                where = choose_location("auto", k, t, hidden, dtype, device)
                ev.store = ActivationStore(k, t, hidden, dtype, device, where, check_finite=False)
                ev.kwargs = capture_layer0_inputs(model, layers, ev.windows, ev.store, ev.batch_size, device)
        cache = _reuse_cache(adapter, layers, cfg, store)
        passes = LayerPasses(adapter, store, kwargs, bs, cache)
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            if streamer is not None:
                with _timed(state, "stream"):
                    streamer.fetch(i, layer)
            home = next(layer.parameters()).device  # where the layer lives between its turns
            layer.to(device)
            if rotation is not None:
                from rsq.rotation.rotate import rotate_layer

                with _timed(state, "rotate"):
                    rotate_layer(layer, adapter, rotation)
            if i < start_layer:
                _restore_layer(i, layer, adapter, cfg, state)
            passes.begin(layer)
            if i >= start_layer and cfg.quantizes:
                report = _quantize_one_layer(
                    i, layer, adapter, cfg, store, kwargs, window_fn, state, weight_fn, ctx, n_total, passes
                )
            else:
                report = None
            if not replay:
                with _timed(state, "propagate"):
                    for a, b in store.batches(bs):
                        store.set(a, b, passes.output(a, b))
            if evals:
                with _timed(state, "eval_propagate"):
                    for ev in evals:
                        for a, b in ev.store.batches(ev.batch_size):
                            ev.store.set(a, b, layer_forward(layer, ev.store.get(a, b), ev.kwargs))
            layer.to(home, non_blocking=True)  # to pinned host memory, asynchronously, from a GPU
            if report is not None:
                report.seconds = time.perf_counter() - t0
                state.layers.append(report)
                if on_layer_done is not None:
                    _sync()  # the layer's codes and weights have reached the host
                    on_layer_done(i, state)
            if streamer is not None:
                _sync()
                streamer.release(i, layer)
            if progress is not None:
                progress(i + 1, len(layers), f"layer {i}")
    finally:
        _sync()
        store.close()
        if cache is not None:
            cache.close()
    return state


@torch.no_grad()
def restore_finished(
    model: nn.Module, cfg: RSQConfig, state: RunState, *, adapter: ModelAdapter | None = None, rotation=None
) -> None:
    """A resumed run whose layers were all finished: rotate (if planned) and give every layer the
    W_hat of its saved results, without calibrating or propagating anything."""
    adapter = adapter or resolve(model)
    device = resolve_device(cfg.device)
    if rotation is not None:
        from rsq.rotation.rotate import rotate_ends, rotate_layer

        with _timed(state, "rotate"):
            rotate_ends(model, adapter, rotation, device)
    for i, layer in enumerate(adapter.get_layers(model)):
        home = next(layer.parameters()).device
        layer.to(device)
        if rotation is not None:
            with _timed(state, "rotate"):
                rotate_layer(layer, adapter, rotation)
        _restore_layer(i, layer, adapter, cfg, state)
        layer.to(home)


def _restore_layer(index: int, layer: nn.Module, adapter: ModelAdapter, cfg: RSQConfig, state: RunState) -> None:
    """A finished layer of a resumed run: its linears get the W_hat of their saved results."""
    for name in adapter.linears:
        res = state.results.get(f"{adapter.layers}.{index}.{name}")
        if res is not None:
            module = layer.get_submodule(name)
            module.weight.data = dequantize_result(res, cfg.grid).to(module.weight.device, module.weight.dtype)


def _reuse_cache(adapter: ModelAdapter, layers, cfg: RSQConfig, store: ActivationStore) -> ActivationStore | None:
    """The buffer rsq.calib.blockpass shares the attention output through, where the block allows it
    and it fits: beside device-resident activations on the GPU if under a quarter of its free memory,
    beside host activations on the CPU device; None means full layer passes (a second host copy of
    offloaded activations, 69 GB for x8 expansion at 8B, would cost more than it saves)."""
    o_proj = layers[0].get_submodule(adapter.o_proj)
    if (
        not adapter.prenorm_residual
        or not cfg.quantizes
        or cfg.solver.algorithm == "rtn"
        or o_proj.in_features != store.shape[2]
    ):
        return None
    n, t, d = store.shape
    if store.device.type == "cpu":
        return ActivationStore(n, t, d, store.dtype, store.device, "cpu") if store.location == "cpu" else None
    if store.location != "device" or choose_location("auto", n, t, d, store.dtype, store.device) != "device":
        return None
    return ActivationStore(n, t, d, store.dtype, store.device, "device")


def _window_fn(windows: torch.Tensor, expand: int):
    """Window i of the (optionally expanded) calibration set, made on the fly (spec §5)."""
    if expand == 1:
        return lambda i: windows[i]
    from rsq.importance import rolled_window

    return lambda i: rolled_window(windows, i, expand)


def _quantize_one_layer(
    index: int,
    layer: nn.Module,
    adapter: ModelAdapter,
    cfg: RSQConfig,
    store: ActivationStore,
    kwargs: dict,
    window_fn,
    state: RunState,
    weight_fn,
    ctx: DistContext,
    n_total: int,
    passes: LayerPasses,
) -> LayerReport:
    bs = cfg.batch_size
    weights: list[torch.Tensor] | None = None
    imp_summary = None
    if weight_fn is not None:
        with _timed(state, "importance"):
            weights = []
            for a, b in store.batches(bs):
                ids = torch.stack([window_fn(j) for j in range(a, b)])
                w = weight_fn(index, layer, store.get(a, b), kwargs, ids)
                weights.append(None if w is None else w.float())
            if any(w is None for w in weights):
                weights = None
            else:
                allw = torch.cat(weights).cpu()  # one copy (a copy per batch stalls the queue)
                state.importance_maps[index] = allw[0].clone()
                imp_summary = {
                    "first_token_mean": allw[:, 0].mean().item(),
                    "median": allw.median().item(),
                    "max": allw.max().item(),
                    "min": allw.min().item(),
                }
    losses: dict[str, float] = {}
    rel_losses: dict[str, float] = {}
    hdtype = torch.float64 if cfg.solver.hessian_dtype == "float64" else torch.float32
    position = 0  # module number within the layer: decides its owner rank
    for group in adapter.groups:
        modules = [layer.get_submodule(name) for name in group]
        width = modules[0].in_features
        H = None
        if cfg.solver.algorithm != "rtn":
            acc = HessianAccumulator(
                width,
                device=store.device,
                dtype=hdtype,
                half_inputs=cfg.solver.hessian_matmul == "auto",
                kernels=cfg.kernels,
            )
            with _timed(state, "hessian"):
                for k, x in passes.group_inputs(group):
                    acc.add(x, None if weights is None else weights[k])
            ctx.all_reduce_sum(acc.sum)
            acc.nseq = n_total
            H = acc.finalize()
        with _timed(state, "solve"):
            energy = {name: _energy(m.weight.data, H) for name, m in zip(group, modules)}
            mine = {}
            # members share H and GPTQ treats rows independently: one solve on the stacked rows. Done
            # the same way with one rank or several (one owner per stacked group), so that GPU matmul
            # shapes, and with them the rounding, are identical and the weights bit-equal.
            stack = H is not None and cfg.grid.format.stackable and len(group) > 1
            if stack:
                owners = [ctx.owner(position)] * len(group)
                if owners[0] == ctx.rank:
                    names = [f"{adapter.layers}.{index}.{name}" for name in group]
                    W = torch.cat([m.weight.data.to(store.device) for m in modules])
                    stacked = gptq_quantize(W, H, cfg.grid, cfg.solver, "+".join(names), cfg.kernels)
                    for name, part in zip(group, split_rows(stacked, [m.out_features for m in modules])):
                        mine[name] = part
            else:
                owners = [ctx.owner(position + k) for k in range(len(group))]
                for name, module, owner in zip(group, modules, owners):
                    if owner == ctx.rank:
                        full = f"{adapter.layers}.{index}.{name}"
                        W = module.weight.data.to(store.device)
                        mine[name] = (
                            rtn_result(W, cfg.grid, full, cfg.kernels) if H is None else _solve(W, H, cfg, full)
                        )
            position += 1 if stack else len(group)
            for name, module, owner in zip(group, modules, owners):
                res = share_result(ctx, mine.get(name), owner)
                # W_hat from the codes where they are (the owner's device: no host round trip)
                module.weight.data = dequantize_result(res, cfg.grid).to(module.weight.device, module.weight.dtype)
                state.results[f"{adapter.layers}.{index}.{name}"] = _to_cpu(res)
                losses[name] = res.loss
                rel_losses[name] = res.loss / energy[name] if energy[name] > 0 else float("nan")
    return LayerReport(index=index, seconds=0.0, losses=losses, importance=imp_summary, rel_losses=rel_losses)


def _energy(W: torch.Tensor, H: torch.Tensor | None) -> float:
    """The denominator of a module's relative loss: tr(W H W^T) / 2 (GPTQ's loss is half the output
    error increase), or ||W||^2 without a Hessian (RTN's loss is the squared weight error)."""
    if H is None:
        return float(W.float().pow(2).sum())
    W = W.to(H.device, H.dtype)
    return float(((W @ H) * W).sum()) / 2


def share_result(ctx: DistContext, res: QuantResult | None, owner: int) -> QuantResult:
    """The owner's result on every rank (metadata as an object, tensors by broadcast)."""
    if not ctx.enabled:
        return res
    head = None
    if ctx.rank == owner:
        head = {k: (tuple(getattr(res, k).shape), getattr(res, k).dtype) for k in ("codes", "scale", "zero")}
        head.update(loss=res.loss, damp=res.damp, meta=res.meta)
    head = ctx.broadcast_object(head, owner)
    tensors = {}
    for key in ("codes", "scale", "zero"):
        shape, dtype = head[key]
        t = getattr(res, key) if ctx.rank == owner else torch.empty(shape, dtype=dtype)
        t = t.cuda() if ctx.backend == "nccl" else t.cpu()
        tensors[key] = ctx.broadcast(t, owner).cpu()
    return QuantResult(weight=None, loss=head["loss"], damp=head["damp"], meta=head["meta"], **tensors)


def _solve(W: torch.Tensor, H: torch.Tensor, cfg: RSQConfig, name: str) -> QuantResult:
    """The grid's format names its solver (rsq/formats/): GPTQ for scalar grids, LDLQ for E8P."""
    if cfg.grid.format.solver == "ldlq":
        from rsq.solver.ldlq import ldlq_quantize

        return ldlq_quantize(W, H, cfg.grid, cfg.solver, name)
    return gptq_quantize(W, H, cfg.grid, cfg.solver, name, cfg.kernels)


def _to_cpu(res: QuantResult) -> QuantResult:
    """Keep codes and scales only, on the host: the model holds W_hat, and
    checkpoint.schema.dequantize_result rebuilds it exactly from the codes (8B models would
    otherwise keep a second float copy)."""
    # from the GPU: asynchronous copies into pinned memory (pageable ones ran at ~1 GB/s on the
    # lent H100 host); quantize_layers synchronizes before anything on the host reads them
    res.codes, res.scale, res.zero = (t.to("cpu", non_blocking=True) for t in (res.codes, res.scale, res.zero))
    res.weight = None
    return res
