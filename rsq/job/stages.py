"""The per-layer stages the layer loop (rsq.job.loop) runs, in order, on each decoder layer.

Each stage is chosen once, before the first layer, and knows its own mode: the loop never asks
whether a run is resumed, streamed, distributed or evaluating.

    RotateLayers     the layer's share of the rotation plan (the model's ends before the first layer)
    RestoreFinished  a layer finished by an earlier session (resume) gets the W_hat of its saved codes
    QuantizeLayer    importance -> Hessian per sequential group (summed over ranks) -> solve -> W_hat
    Propagate        the calibration activations through the (quantized) layer, for the next one
    EvalPropagate    evaluation windows through the quantized layer (a streamed model's perplexity)

Numerics live in rsq.solver, rsq.quant, rsq.importance and rsq.rotation; architecture knowledge in
rsq.models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from rsq.calib.blockpass import LayerPasses
from rsq.calib.capture import ActivationStore, capture_layer0_inputs, choose_location, layer_forward
from rsq.checkpoint.schema import dequantize_result
from rsq.config import RSQConfig, resolve_unrotated
from rsq.distributed import DistContext
from rsq.errors import NonFiniteError
from rsq.importance import rolled_window
from rsq.importance.sites import KEEP_FLOAT, KEEP_FLOAT_ON_LOSS, InputStats
from rsq.job.state import LayerReport, RunState, timed
from rsq.models.adapter import ModelAdapter
from rsq.models.device import resolve_device
from rsq.rotation.rotate import rotate_ends, rotate_layer
from rsq.solver.gptq import gptq_quantize, rtn_result, split_rows
from rsq.solver.hessian import HessianAccumulator, hessian_arithmetic
from rsq.solver.ldlq import ldlq_quantize
from rsq.solver.result import QuantResult


class Stage:
    """One step of every layer's turn. ``prepare(model)`` runs once before the first layer,
    ``__call__`` at each layer's turn (the layer on the compute device), ``close`` at the end."""

    def prepare(self, model: nn.Module) -> None:
        pass

    def __call__(self, index: int, layer: nn.Module) -> LayerReport | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RotateLayers(Stage):
    """A :class:`rsq.rotation.rotate.RotationPlan` applied on the way: the model's ends before the
    calibration capture, each layer on the device at its turn (not a whole-model pass on the host)."""

    def __init__(self, plan, adapter: ModelAdapter, device: torch.device, state: RunState):
        self.plan, self.adapter, self.device, self.state = plan, adapter, device, state

    def prepare(self, model: nn.Module) -> None:
        with timed(self.state, "rotate"):
            rotate_ends(model, self.adapter, self.plan, self.device)

    def __call__(self, index: int, layer: nn.Module) -> None:
        with timed(self.state, "rotate"):
            rotate_layer(layer, self.adapter, self.plan)


class RestoreFinished(Stage):
    """Layers below ``store.start`` were finished by an earlier session: their linears get the
    W_hat of their saved codes (read from the run store at their turn)."""

    def __init__(self, store, adapter: ModelAdapter, cfg: RSQConfig, state: RunState):
        self.store, self.adapter, self.cfg, self.state = store, adapter, cfg, state

    def __call__(self, index: int, layer: nn.Module) -> None:
        if index >= self.store.start:
            return
        self.store.restore_results(index, self.state)
        restore_layer(index, layer, self.adapter, self.cfg, self.state)


def restore_layer(index: int, layer: nn.Module, adapter: ModelAdapter, cfg: RSQConfig, state: RunState) -> None:
    """A finished layer's linears get the W_hat of their results in ``state``."""
    for name in adapter.linears:
        res = state.results.get(f"{adapter.layers}.{index}.{name}")
        if res is not None:
            module = layer.get_submodule(name)
            module.weight.data = dequantize_result(res, cfg.grid).to(module.weight.device, module.weight.dtype)


class Calibration:
    """The calibration windows' hidden states at the current layer's input (N, T, hidden), this
    rank's share of them, and the passes that feed each sequential group (rsq.calib.blockpass)."""

    def __init__(self, cfg: RSQConfig, windows: torch.Tensor, adapter: ModelAdapter, ctx: DistContext, model):
        self.cfg, self.windows, self.adapter = cfg, windows, adapter
        self.n_total = windows.shape[0] * cfg.importance.expand
        local = ctx.shard(self.n_total)
        every = _window_fn(windows, cfg.importance.expand)
        self.window_fn = lambda i: every(local[i])
        dtype, hidden = next(model.parameters()).dtype, model.config.hidden_size
        device = resolve_device(cfg.device)
        requested = cfg.offload if cfg.importance.expand == 1 or cfg.offload != "auto" else "disk"
        where = choose_location(requested, len(local), windows.shape[1], hidden, dtype, device)
        self.store = ActivationStore(len(local), windows.shape[1], hidden, dtype, device, where)
        self.kwargs: dict = {}
        self.passes: LayerPasses | None = None
        self.cache: ActivationStore | None = None
        self.down_cache: ActivationStore | None = None

    captures = True

    @property
    def device(self) -> torch.device:
        return self.store.device

    def capture(self, model: nn.Module) -> None:
        layers = self.adapter.get_layers(model)
        bs, device = self.cfg.batch_size, self.store.device
        self.kwargs = capture_layer0_inputs(model, layers, self.windows, self.store, bs, device, self.window_fn)
        self.layer0 = layers[0]

    def begin(self, layer: nn.Module) -> LayerPasses:
        if self.passes is None:  # after every capture (the evaluation windows' too): it sizes itself
            self.cache = _reuse_cache(self.adapter, self.layer0, self.cfg, self.store)
            self.down_cache = _down_cache(self.adapter, self.layer0, self.cfg, self.store, self.cache)
            self.passes = LayerPasses(
                self.adapter, self.store, self.kwargs, self.cfg.batch_size, self.cache, self.down_cache
            )
        self.passes.begin(layer)
        return self.passes

    def close(self) -> None:
        self.store.close()
        for buffer in (self.cache, self.down_cache):
            if buffer is not None:
                buffer.close()


class NoActivations:
    """The Calibration of a solve that reads no activation (round-to-nearest without importance
    weights): nothing is captured, passed through the layers or propagated."""

    captures = False

    def __init__(self, cfg: RSQConfig, adapter: ModelAdapter):
        self.cfg, self.adapter, self.device = cfg, adapter, resolve_device(cfg.device)

    def capture(self, model: nn.Module) -> None:
        pass

    def begin(self, layer: nn.Module) -> None:
        return None

    def close(self) -> None:
        pass


class QuantizeLayer(Stage):
    """Importance, then per sequential group: Hessian (summed over ranks), solve, W_hat written
    back so that later groups and layers see the quantization error. Layers below ``start`` (resume)
    only start their passes. ``weight_fn(layer_index, layer, x, kwargs, ids)``: per-token weights
    (B, T), or None for uniform (rsq.importance)."""

    def __init__(self, calib: Calibration, state: RunState, ctx: DistContext, weight_fn=None, start: int = 0):
        self.calib, self.cfg, self.state, self.ctx, self.weight_fn = calib, calib.cfg, state, ctx, weight_fn
        self.adapter, self.start = calib.adapter, start

    def prepare(self, model: nn.Module) -> None:
        with timed(self.state, "capture" if self.calib.captures else None):
            self.calib.capture(model)

    def __call__(self, index: int, layer: nn.Module) -> LayerReport | None:
        passes = self.calib.begin(layer)
        if index < self.start or not self.cfg.quantizes:
            return None
        weights, summary = self._importance(index, layer)
        losses: dict[str, float] = {}
        rel_losses: dict[str, float] = {}
        sites: dict[str, dict] = {}
        position = 0  # module number within the layer: decides its owner rank
        for group in self.adapter.groups:
            site_weights = self._site_weights(layer, group, weights)
            # the input statistics ride on the Hessian pass: RTN has none, so it keeps no module in float
            hessian_pass = passes is not None and self.cfg.solver.algorithm != "rtn"
            stats = InputStats() if hessian_pass and self._unrotated_down(layer, group) else None
            H = None if passes is None else self._hessian(group, layer, passes, site_weights, stats)
            keep = self._keep(group, stats, sites)
            guard = stats is not None and not keep and self.cfg.importance.unrotated_outliers == KEEP_FLOAT_ON_LOSS
            with timed(self.state, "solve"):
                energy = {name: _energy(layer.get_submodule(name).weight.data, H) for name in group}
                backup = layer.get_submodule(group[0]).weight.data.clone() if guard else None
                position = self._solve_group(index, layer, group, H, position, losses, keep)
                for name in group:
                    rel_losses[name] = losses[name] / energy[name] if energy[name] > 0 else float("nan")
                if guard:
                    self._guard_loss(index, layer, group[0], backup, losses, rel_losses, sites)
        _check_losses(index, losses, self.adapter.layers)
        return LayerReport(
            index=index, seconds=0.0, losses=losses, importance=summary, rel_losses=rel_losses, sites=sites or None
        )

    def _unrotated_down(self, layer: nn.Module, group) -> bool:
        """Whether ``group`` is the down_proj and no online rotation reaches its input."""
        if tuple(group) != (self.adapter.down_proj,):
            return False
        return not hasattr(layer.get_submodule(self.adapter.down_proj), "online_rotation")

    def _keep(self, group, stats: InputStats | None, sites: dict) -> tuple[str, ...]:
        """The members of ``group`` left unquantized: an unrotated down_proj whose input's channel
        peak ratio exceeds importance.outlier_ratio, under --unrotated-outliers keep-float (issue 33).
        Records the statistics of every unrotated down_proj in ``sites``."""
        if stats is None:
            return ()
        imp = self.cfg.importance
        record = stats.summary()
        kept = imp.unrotated_outliers == KEEP_FLOAT and record["channel_peak"] > imp.outlier_ratio
        sites[group[0]] = {**record, "kept": kept}
        return tuple(group) if kept else ()

    def _guard_loss(
        self, index: int, layer: nn.Module, name: str, backup: torch.Tensor, losses: dict, rel_losses: dict, sites: dict
    ) -> None:
        """--unrotated-outliers keep-float-on-loss (issue 33): put the unrotated down_proj ``name``'s float
        weights back when its relative loss exceeds outlier_loss_ratio x the largest relative loss of
        the layer's other linears (quantized before it with the same grid). Before propagation, so the
        next layer calibrates on what the saved model computes. The measured loss stays in rel_losses
        and the site's record says why the module was kept."""
        others = [v for k, v in rel_losses.items() if k != name and math.isfinite(v) and v > 0]
        mine = rel_losses[name]
        ratio = mine / max(others) if others and math.isfinite(mine) else float("nan")
        record = sites[name]
        record["loss_ratio"] = ratio
        if not ratio > self.cfg.importance.outlier_loss_ratio:
            return
        record.update(kept=True, rule="loss", quantized_rel_loss=mine)
        layer.get_submodule(name).weight.data = backup
        self.state.results.pop(f"{self.adapter.layers}.{index}.{name}", None)
        losses[name] = 0.0

    def _importance(self, index: int, layer: nn.Module) -> tuple[list[torch.Tensor] | None, dict | None]:
        if self.weight_fn is None:
            return None, None
        store, kwargs = self.calib.store, self.calib.kwargs
        with timed(self.state, "importance"):
            weights = []
            for a, b in store.batches(self.cfg.batch_size):
                ids = torch.stack([self.calib.window_fn(j) for j in range(a, b)])
                w = self.weight_fn(index, layer, store.get(a, b), kwargs, ids)
                weights.append(None if w is None else w.float())
            if any(w is None for w in weights):
                return None, None
            allw = torch.cat(weights).cpu()  # one copy (a copy per batch stalls the queue)
            self.state.importance_maps[index] = allw[0].clone()
            summary = {
                "first_token_mean": allw[:, 0].mean().item(),
                "median": allw.median().item(),
                "max": allw.max().item(),
                "min": allw.min().item(),
            }
        return weights, summary

    def _site_weights(self, layer: nn.Module, group, weights):
        """The token weights of ``group``'s Hessian: None (uniform) for a down_proj that no online
        rotation reaches when ``importance.unrotated`` resolves to "uniform" (issue 33), else ``weights``."""
        uniform = resolve_unrotated(self.cfg) == "uniform"
        if weights is None or not uniform or tuple(group) != (self.adapter.down_proj,):
            return weights
        return weights if hasattr(layer.get_submodule(self.adapter.down_proj), "online_rotation") else None

    def _hessian(self, group, layer: nn.Module, passes: LayerPasses, weights, stats=None) -> torch.Tensor | None:
        if self.cfg.solver.algorithm == "rtn":
            return None
        solver = self.cfg.solver
        acc = HessianAccumulator(
            layer.get_submodule(group[0]).in_features,
            device=self.calib.store.device,
            dtype=torch.float64 if solver.hessian_dtype == "float64" else torch.float32,
            kernels=self.cfg.kernels,
            **hessian_arithmetic(solver.hessian_matmul),
        )
        with timed(self.state, "hessian"):
            for k, x in passes.group_inputs(group):
                acc.add(x, None if weights is None else weights[k])
                if stats is not None:
                    stats.add(x)
        self.ctx.all_reduce_sum(acc.sum)
        acc.nseq = self.calib.n_total
        return acc.finalize()

    def _solve_group(self, index: int, layer: nn.Module, group, H, position: int, losses: dict, keep=()) -> int:
        """Solve ``group``'s modules (this rank's share), share the results, write W_hat back.
        Members in ``keep`` stay unquantized (no result, loss 0)."""
        cfg, ctx, device = self.cfg, self.ctx, self.calib.device
        modules = [layer.get_submodule(name) for name in group]
        names = [f"{self.adapter.layers}.{index}.{name}" for name in group]
        mine = {}
        # members share H and GPTQ treats rows independently: one solve on the stacked rows. Done
        # the same way with one rank or several (one owner per stacked group), so that GPU matmul
        # shapes, and with them the rounding, are identical and the weights bit-equal.
        stack = H is not None and cfg.grid.format.stackable and len(group) > 1
        if stack:
            owners = [ctx.owner(position)] * len(group)
            if owners[0] == ctx.rank:
                W = torch.cat([m.weight.data.to(device) for m in modules])
                stacked = gptq_quantize(W, H, cfg.grid, cfg.solver, "+".join(names), cfg.kernels)
                mine = dict(zip(group, split_rows(stacked, [m.out_features for m in modules])))
        else:
            owners = [ctx.owner(position + k) for k in range(len(group))]
            for name, full, module, owner in zip(group, names, modules, owners):
                if owner == ctx.rank and name not in keep:
                    W = module.weight.data.to(device)
                    mine[name] = rtn_result(W, cfg.grid, full, cfg.kernels) if H is None else _solve(W, H, cfg, full)
        for name, full, module, owner in zip(group, names, modules, owners):
            if name in keep:
                losses[name] = 0.0
                continue
            res = share_result(ctx, mine.get(name), owner)
            # W_hat from the codes where they are (the owner's device: no host round trip)
            module.weight.data = dequantize_result(res, cfg.grid).to(module.weight.device, module.weight.dtype)
            self.state.results[full] = _to_cpu(res)
            losses[name] = res.loss
        return position + (1 if stack else len(group))


class Propagate(Stage):
    """The calibration activations through the finished layer: the next layer's inputs."""

    def __init__(self, calib: Calibration, state: RunState):
        self.calib, self.state = calib, state

    def __call__(self, index: int, layer: nn.Module) -> None:
        store, passes = self.calib.store, self.calib.passes
        with timed(self.state, "propagate"):
            for a, b in store.batches(self.calib.cfg.batch_size):
                store.set(a, b, passes.output(a, b))
            store.check()  # one host sync per layer, not one per batch

    def close(self) -> None:
        self.calib.close()


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


class EvalPropagate(Stage):
    def __init__(self, evals: list[EvalPass], adapter: ModelAdapter, device: torch.device, state: RunState):
        self.evals, self.adapter, self.device, self.state = evals, adapter, device, state

    def prepare(self, model: nn.Module) -> None:
        layers = self.adapter.get_layers(model)
        dtype, hidden = next(model.parameters()).dtype, model.config.hidden_size
        for ev in self.evals:
            with timed(self.state, "eval_capture"):
                k, t = ev.windows.shape
                where = choose_location("auto", k, t, hidden, dtype, self.device)
                ev.store = ActivationStore(k, t, hidden, dtype, self.device, where, check_finite=False)
                ev.kwargs = capture_layer0_inputs(model, layers, ev.windows, ev.store, ev.batch_size, self.device)

    def __call__(self, index: int, layer: nn.Module) -> None:
        with timed(self.state, "eval_propagate"):
            for ev in self.evals:
                for a, b in ev.store.batches(ev.batch_size):
                    ev.store.set(a, b, layer_forward(layer, ev.store.get(a, b), ev.kwargs))


def _energy(W: torch.Tensor, H: torch.Tensor | None) -> float:
    """The denominator of a module's relative loss: tr(W H W^T) / 2 (GPTQ's loss is half the output
    error increase), or ||W||^2 without a Hessian (RTN's loss is the squared weight error)."""
    if H is None:
        return float(W.float().pow(2).sum())
    W = W.to(H.device, H.dtype)
    return float(((W @ H) * W).sum()) / 2


def _check_losses(index: int, losses: dict[str, float], prefix: str) -> None:
    for name, loss in losses.items():
        if not math.isfinite(loss):
            raise NonFiniteError(
                f"the quantization loss of {prefix}.{index}.{name} is {loss} (quantize stage, layer {index}): "
                "the weights or calibration activations overflowed or hold NaN/Inf; check the model's weights, "
                "else try --dtype float32, a larger --damp or more --bits"
            )


def _reuse_cache(adapter: ModelAdapter, layer0: nn.Module, cfg: RSQConfig, store: ActivationStore):
    """The buffer rsq.calib.blockpass shares the attention output through, where the block allows it
    and it fits: beside device-resident activations on the GPU if under a quarter of its free memory,
    beside host activations on the CPU device; None means full layer passes (a second host copy of
    offloaded activations, 69 GB for x8 expansion at 8B, would cost more than it saves)."""
    o_proj = layer0.get_submodule(adapter.o_proj)
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


# the down_proj inputs are kept on a CPU device only up to this size (tests and tiny models): the
# host memory plan of larger CPU runs does not count them
DOWN_CACHE_HOST_BYTES = 256 * 2**20


def _down_cache(adapter: ModelAdapter, layer0: nn.Module, cfg: RSQConfig, store: ActivationStore, cache):
    """The (K, T, MLP width) buffer the down pass keeps down_proj's inputs in, so that propagation
    does not compute the gate and up products again for those sequences (rsq.calib.blockpass): the
    first K of the N calibration sequences, K a multiple of the batch size, as many as fit (all of
    them where they do): beside a reuse cache on the GPU within 80 % of the free memory less the
    layer's working set (Llama-3-8B at 256 x 4096: all 30 GB on an H100; Qwen2.5-7B's 40 GB: all on
    an H200, most on an H100), on a CPU device up to DOWN_CACHE_HOST_BYTES; None where not even one
    batch fits (the propagation recomputes them all)."""
    if cache is None:
        return None
    down = layer0.get_submodule(adapter.down_proj)
    n, t, d = store.shape
    inter, size = down.in_features, torch.finfo(store.dtype).bits // 8
    per_sequence = t * inter * size
    if store.device.type == "cpu":
        budget = DOWN_CACHE_HOST_BYTES
    elif store.device.type != "cuda" or cache.location != "device":
        return None
    else:
        # the layer (and its copy being written back), two Hessians of the widest input, the solver's
        # copy, and a batch's MLP intermediates in flight (with the importance / attention's scratch)
        layer_bytes = sum(p.numel() for p in layer0.parameters()) * size
        width = max(d, inter)
        working = 2 * layer_bytes + 3 * 4 * width * width + 4 * cfg.batch_size * t * (3 * inter + 4 * d) * size
        free, _ = torch.cuda.mem_get_info(store.device)
        budget = 0.8 * free - working
    keep = min(n, int(budget // per_sequence) // cfg.batch_size * cfg.batch_size)
    if keep < 1:
        return None
    location = "cpu" if store.device.type == "cpu" else "device"
    return ActivationStore(keep, t, inter, store.dtype, store.device, location)


def _window_fn(windows: torch.Tensor, expand: int) -> Callable[[int], torch.Tensor]:
    """Window i of the (optionally expanded) calibration set, made on the fly (spec §5)."""
    if expand == 1:
        return lambda i: windows[i]
    return lambda i: rolled_window(windows, i, expand)


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
        return ldlq_quantize(W, H, cfg.grid, cfg.solver, name)
    return gptq_quantize(W, H, cfg.grid, cfg.solver, name, cfg.kernels)


def _to_cpu(res: QuantResult) -> QuantResult:
    """Keep codes and scales only, on the host: the model holds W_hat, and
    checkpoint.schema.dequantize_result rebuilds it exactly from the codes (8B models would
    otherwise keep a second float copy)."""
    # from the GPU: asynchronous copies into pinned memory (pageable ones ran at ~1 GB/s on the
    # lent H100 host); the layer loop synchronizes before anything on the host reads them
    res.codes, res.scale, res.zero = (t.to("cpu", non_blocking=True) for t in (res.codes, res.scale, res.zero))
    res.weight = None
    return res
