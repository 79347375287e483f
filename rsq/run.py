"""One quantization job with its output directory: atomic writes, resume, results.json.

The output is built in ``<out>.partial/`` next to ``<out>`` and renamed into place only when
complete. After every finished layer the partial directory holds that layer's quantized tensors and
``state.json``; ``resume=True`` reloads them, replays the finished layers forward (cheap) and
continues, which gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import random
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import rsq
from rsq import jsonsafe
from rsq.calib.datasets import eval_windows, sample_windows, tokenize
from rsq.config import EVAL_SEQLEN, EVAL_WINDOWS, TORCH_DTYPES, RSQConfig
from rsq.distributed import DistContext, rank_device
from rsq.errors import CheckpointFormatError, ConfigError, NonFiniteError, RSQError
from rsq.eval.perplexity import perplexity
from rsq.loading import describe_source, load_config, load_model
from rsq.loss_outliers import RAW_RATIO, REL_RATIO, find_loss_outliers, outlier_line
from rsq.models.registry import resolve
from rsq.pipeline import LayerReport, RunState, quantize_layers, resolve_device, restore_finished
from rsq.solver.result import QuantResult

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict:
    import transformers

    return {
        "rsq": rsq.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def partial_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.partial"


def check_output(out: Path, cfg: RSQConfig, resume: bool, overwrite: bool) -> dict | None:
    """Check the destination without touching it; return the state to resume from (if any).

    A resumable ``<out>.partial/`` (one with state.json) is never discarded silently: without
    --resume or --overwrite the run stops and says so; with --resume its options must match."""
    from rsq.preflight import check_output_location

    check_output_location(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output directory {out} already exists: pass --overwrite or choose another --out")
    part = partial_dir(out)
    state_file = part / STATE_FILE
    if not state_file.is_file():
        if resume:
            log.warning("--resume: no unfinished run in %s, starting from the beginning", part)
        return None
    if not resume and overwrite:
        return None  # --overwrite discards it
    try:
        saved = json.loads(state_file.read_text())
        done, options = int(saved["finished_layers"]), saved["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not resume:
            raise ConfigError(
                f"{part} holds an unfinished run whose {STATE_FILE} is unreadable ({exc}): pass --overwrite to "
                "discard it and start over"
            ) from exc
        raise CheckpointFormatError(f"{state_file} is corrupt ({exc}): delete {part} and rerun") from exc
    if not resume:
        raise ConfigError(
            f"{part} holds an unfinished run ({done} finished layers): pass --resume to continue it, or "
            "--overwrite to discard it and start over"
        )
    if options != cfg.to_dict():
        raise ConfigError(
            f"--resume: the unfinished run in {part} used different options; rerun with the same options, "
            "or with --overwrite instead of --resume to start over"
        )
    return saved


def create_partial(out: Path, saved: dict | None) -> Path:
    """The partial directory: kept when resuming, else made fresh (whatever was there goes)."""
    part = partial_dir(out)
    if saved is not None:
        return part
    if part.is_dir():
        shutil.rmtree(part)
    elif part.exists():
        part.unlink()
    part.mkdir(parents=True)
    return part


def can_resume(out: Path, cfg: RSQConfig) -> bool:
    """Whether ``out`` has an unfinished run of exactly ``cfg`` that ``resume=True`` would continue."""
    state = partial_dir(out) / STATE_FILE
    try:
        return json.loads(state.read_text())["config"] == cfg.to_dict()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _save_layer(
    part: Path, index: int, state: RunState, cfg: RSQConfig, prefix: str, sessions: list, streamed: bool = False
) -> None:
    tensors = {}
    for name, res in state.results.items():
        if name.startswith(f"{prefix}.{index}."):
            tensors[f"{name}.codes"] = res.codes.contiguous()
            tensors[f"{name}.scale"] = res.scale.contiguous()
            tensors[f"{name}.zero"] = res.zero.contiguous()
    if index in state.importance_maps:  # kept so a resumed run's importance.safetensors is complete
        tensors["importance"] = state.importance_maps[index].contiguous()
    tmp = part / f"layer-{index:04d}.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, part / f"layer-{index:04d}.safetensors")
    record = {
        "config": cfg.to_dict(),
        "finished_layers": index + 1,
        "layers": [vars(r) for r in state.layers],
        "results_meta": {k: {"loss": r.loss, "damp": r.damp, "meta": r.meta} for k, r in state.results.items()},
        "timings": state.timings,
        "sessions": sessions,
        "streamed": streamed,  # a streamed run's checkpoint shards are in the directory too
    }
    tmp = part / (STATE_FILE + ".tmp")
    tmp.write_text(jsonsafe.dumps(record))
    os.replace(tmp, part / STATE_FILE)


def _load_layers(part: Path, saved: dict, model, cfg: RSQConfig, lazy: bool = False) -> RunState:
    """The finished layers' reports and results. ``lazy`` (a streamed run): the results' codes
    stay on disk until :func:`_load_layer_codes` reads one layer's at its turn."""
    if saved["config"] != cfg.to_dict():
        raise ConfigError(
            f"--resume: the unfinished run in {part} used different options; rerun with the same options "
            "or without --resume"
        )
    adapter = resolve(model)
    state = RunState(timings=dict(saved.get("timings", {})))
    for rec in saved["layers"]:
        state.layers.append(LayerReport(**rec))
    for index in range(saved["finished_layers"]):
        if lazy:
            importance = _read_layer_file(part, index, only="importance")
            if "importance" in importance:
                state.importance_maps[index] = importance["importance"]
            for name in adapter.linears:
                full = f"{adapter.layers}.{index}.{name}"
                meta = saved["results_meta"][full]
                state.results[full] = QuantResult(None, None, None, None, meta["loss"], meta["damp"], meta["meta"])
        else:
            _load_layer_codes(part, index, saved, adapter, state)
    return state


def _read_layer_file(part: Path, index: int, only: str | None = None) -> dict[str, torch.Tensor]:
    path = part / f"layer-{index:04d}.safetensors"
    try:
        if only is None:
            return load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return {only: handle.get_tensor(only)} if only in handle.keys() else {}
    except Exception as exc:  # safetensors raises several types for truncated files
        raise CheckpointFormatError(f"{path} is unreadable ({exc}): delete {part} and rerun") from exc


def _load_layer_codes(part: Path, index: int, saved: dict, adapter, state: RunState) -> None:
    """Layer ``index``'s saved codes and scales into ``state.results`` (and its importance map)."""
    tensors = _read_layer_file(part, index)
    if "importance" in tensors:
        state.importance_maps[index] = tensors["importance"]
    for name in adapter.linears:
        full = f"{adapter.layers}.{index}.{name}"
        meta = saved["results_meta"][full]
        res = QuantResult(
            codes=tensors[f"{full}.codes"],
            scale=tensors[f"{full}.scale"],
            zero=tensors[f"{full}.zero"],
            weight=None,
            loss=meta["loss"],
            damp=meta["damp"],
            meta=meta["meta"],
        )
        state.results[full] = res  # the pipeline writes W_hat when the layer's turn comes


def _drop_layer_codes(index: int, adapter, state: RunState) -> None:
    """A streamed run keeps a finished layer's losses, not its codes (they are on disk)."""
    for name in adapter.linears:
        res = state.results.get(f"{adapter.layers}.{index}.{name}")
        if res is not None:
            res.codes = res.scale = res.zero = res.weight = res.row_loss = None


def choose_stream(cfg: RSQConfig, stream: bool | None, preloaded) -> Path | None:
    """The directory a run streams its model from, or None for the in-memory path. ``stream``:
    None decides (a local safetensors directory and a quantizing method stream), False never
    streams, True insists (ConfigError where it cannot)."""
    from rsq.streaming import streamable

    path = streamable(cfg.model or None) if preloaded is None and cfg.quantizes and stream is not False else None
    if stream and path is None:
        raise ConfigError(
            f"streaming needs a quantizing method and a local directory of safetensors weights (config.json + "
            f"model.safetensors or an index), not {cfg.model or 'the embedded GGUF model'!r}: drop the stream "
            "option to load the model into memory"
        )
    return path


def run_quantize(
    cfg: RSQConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    ppl_sources: tuple[str, ...] = ("wikitext2",),
    ppl_seqlen: int = EVAL_SEQLEN,
    ppl_max_windows: int | None = EVAL_WINDOWS,
    ppl_batch_size: int | None = None,
    force_seqlen: bool = False,
    check_memory: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
    stop_after_layer: int | None = None,
    preloaded: tuple | None = None,
    dist_ctx: DistContext | None = None,
    calibration: torch.Tensor | None = None,
    stream: bool | None = None,
) -> dict | None:
    """Quantize ``cfg.model`` as ``cfg`` says, evaluate perplexity, write ``out``. Returns results.

    Everything that can be checked before the work is checked first (rsq.preflight): bad input
    raises an RSQError and creates nothing. ``ppl_batch_size``: windows per evaluation forward
    (None: the most, up to 4, that the memory plan fits). ``force_seqlen``: allow window lengths
    beyond the model's context. ``check_memory``: refuse a job whose predicted peak host memory
    exceeds what is available (CPU runs).
    ``stop_after_layer`` (testing aid) ends the run after that layer as if it had been killed.
    ``preloaded`` = (model, tokenizer) skips loading (the model is modified in place: pass a copy).
    ``dist_ctx``: with several ranks (torchrun), only rank 0 touches the output directory.
    ``calibration``: token ids instead of ``cfg.calib.source``'s text: (N, T) windows used as they
    are, or a 1-D token stream sampled into ``cfg.calib`` windows.
    ``stream``: read the model layer by layer from its safetensors files and write each finished
    layer's shard as it finishes (rsq.streaming), so host memory does not grow with the model; None
    (default) streams a local safetensors directory, False loads the whole model (the only path for
    GGUF files, hub ids and quantized sources), True refuses a source that cannot stream.
    """
    from rsq import preflight

    ctx = dist_ctx or DistContext()
    out = Path(out)
    ppl_sources = tuple(ppl_sources)
    preflight.check_lengths(
        ppl_seqlen=ppl_seqlen if ppl_sources else None, ppl_max_windows=ppl_max_windows, ppl_batch_size=ppl_batch_size
    )
    device = resolve_device(rank_device(ctx, cfg.device) if ctx.enabled else cfg.device)
    saved, problem = None, None
    if ctx.is_main:
        try:
            saved = check_output(out, cfg, resume, overwrite)
        except RSQError as exc:
            problem = exc
    problem_text, saved = ctx.broadcast_object((None if problem is None else str(problem), saved), 0)
    if problem is not None:
        raise problem
    if problem_text is not None:
        raise ConfigError(problem_text)
    config = preloaded[0].config if preloaded is not None else load_config(cfg.model or None)
    preflight.check_model(config, cfg, ppl_seqlen=ppl_seqlen if ppl_sources else None, force_seqlen=force_seqlen)
    # a resume may change the mode: the finished layers' codes are in layer-*.safetensors either way
    stream_path = choose_stream(cfg, stream, preloaded)
    streamed = None
    if stream_path is not None:  # the files' headers against the config: before any output exists
        from rsq.streaming import open_streamed

        streamed = open_streamed(stream_path, config, TORCH_DTYPES[cfg.dtype])
    texts = preflight.load_sources(cfg, ppl_sources, calib=calibration is None)
    from rsq.plan import fit_host_memory

    memory = fit_host_memory(
        config,
        cfg,
        device=device,
        ppl_seqlen=ppl_seqlen if ppl_sources else None,
        ppl_batch_size=ppl_batch_size,
        ranks=ctx.world,
        enforce=check_memory,
        preloaded=preloaded is not None,
        text_chars=_text_chars(texts, cfg.calib.source, ppl_sources),
        streamed=streamed is not None,
        ppl_windows=ppl_max_windows if ppl_sources else 0,
    )
    part = partial_dir(out)
    try:
        if ctx.is_main:
            part = create_partial(out, saved)
        return _run(
            cfg,
            out,
            part,
            saved,
            texts,
            memory,
            ppl_sources,
            ppl_seqlen,
            ppl_max_windows,
            progress,
            stop_after_layer,
            preloaded,
            ctx,
            calibration,
            streamed,
        )
    except BaseException:  # errors and interrupts (SIGINT/SIGTERM) alike
        if ctx.is_main and not (part / STATE_FILE).exists():
            shutil.rmtree(part, ignore_errors=True)  # nothing resumable: leave no half-written output
        raise


def _text_chars(texts: dict, calib_source: str, ppl_sources) -> int:
    """Characters of all the text the job tokenizes (lazily read c4 shards count as 0)."""
    sizes = [len(t._calib) for s, t in texts.items() if s == calib_source and isinstance(t._calib, str)]
    sizes += [len(t._eval) for s, t in texts.items() if s in ppl_sources and isinstance(t._eval, str)]
    return sum(sizes)


def _check_losses(index: int, state: RunState, prefix: str) -> None:
    for report in state.layers:
        if report.index != index:
            continue
        for name, loss in report.losses.items():
            if not math.isfinite(loss):
                raise NonFiniteError(
                    f"the quantization loss of {prefix}.{index}.{name} is {loss} (quantize stage, layer {index}): "
                    "the weights or calibration activations overflowed or hold NaN/Inf; check the model's weights, "
                    "else try --dtype float32, a larger --damp or more --bits"
                )


def _check_ppl(value: float, source: str, cfg: RSQConfig) -> None:
    if math.isfinite(value):
        return
    if cfg.quantizes:
        dtype = "" if cfg.dtype in ("float32", "float64") else f" or of --dtype {cfg.dtype} (try --dtype float32)"
        cause = (
            f"the {cfg.method} model's logits are NaN/Inf (overflow of the quantized weights{dtype}); check the "
            "unquantized model with rsq eval, else try more --bits or a larger --damp"
        )
    else:
        cause = "the model itself yields NaN/Inf logits (NaN/Inf weights, or overflow in float16): check its weights"
    raise NonFiniteError(f"perplexity on {source} is {value} (evaluation stage): {cause}")


def _sum_timings(sessions: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for sess in sessions:
        for k, v in sess["timings"].items():
            total[k] = total.get(k, 0.0) + v
    return total


def _run(
    cfg,
    out,
    part,
    saved,
    texts,
    memory,
    ppl_sources,
    ppl_seqlen,
    ppl_max_windows,
    progress,
    stop_after_layer,
    preloaded,
    ctx: DistContext,
    calibration: torch.Tensor | None = None,
    streamed: tuple | None = None,
) -> dict | None:
    timings: dict[str, float] = {}
    host_peaks: dict[str, float] = {}  # stage -> the process's peak RSS up to its end (ru_maxrss)
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    run_cfg = replace(cfg, device=rank_device(ctx, cfg.device)) if ctx.enabled else cfg
    device = resolve_device(run_cfg.device)
    start = 0 if saved is None else int(saved["finished_layers"])
    earlier = list(saved.get("sessions", [])) if saved is not None else []
    session = {"started_after_layers": start, "layers_quantized": [], "timings": timings}

    t0 = time.perf_counter()
    streamer = None
    if preloaded is not None:
        model, tokenizer = preloaded
    elif streamed is not None:
        from rsq.streaming import LayerStreamer, load_tokenizer_and_generation

        model, source = streamed
        streamer = LayerStreamer(source, model, resolve(model), TORCH_DTYPES[cfg.dtype])
        streamer.load_ends()  # the decoder layers stay on meta until their turn
        tokenizer = load_tokenizer_and_generation(source.path, model)
    else:
        model, tokenizer = load_model(cfg.model or None, TORCH_DTYPES[cfg.dtype])
    timings["load"] = time.perf_counter() - t0
    host_peaks["load"] = measured_peak_gib()
    adapter = resolve(model)
    first = adapter.get_layers(model)[0]
    for name in adapter.linears:
        cfg.grid.check_width(first.get_submodule(name).in_features, name)

    # every text is tokenized and windowed before the first layer, so a too-short text fails now
    if calibration is None:
        calib_text = texts[cfg.calib.source]
        calib_ids = tokenize(tokenizer, calib_text.calib)
        windows = sample_windows(calib_ids, cfg.calib.nsamples, cfg.calib.seqlen, cfg.seed)
        calib_record = calib_text.description
    else:
        calib_ids = windows = calibration.long()
        if calib_ids.dim() == 1:
            windows = sample_windows(calib_ids, cfg.calib.nsamples, cfg.calib.seqlen, cfg.seed)
        calib_record = {"source": "tokens passed to rsq.quantize", "shape": list(calib_ids.shape)}
    eval_wins = {s: eval_windows(tokenize(tokenizer, texts[s].eval), ppl_seqlen, ppl_max_windows) for s in ppl_sources}

    plan = None
    if cfg.rotation.enabled:
        from rsq.rotation.rotate import plan_rotation, rotate_model

        t0 = time.perf_counter()
        if cfg.quantizes:  # applied layer by layer on the device as the pipeline reaches them
            plan = plan_rotation(model, adapter, cfg.rotation)
        else:
            rotate_model(model, adapter, cfg.rotation)
        timings["rotate"] = time.perf_counter() - t0

    state = None
    if saved is not None:
        state = _load_layers(part, saved, model, cfg, lazy=streamer is not None)
        log.info("resuming after %d finished layers", start)

    n_layers = len(adapter.get_layers(model))
    layers = adapter.get_layers(model)
    if streamer is not None:
        holder = {"state": state}  # the pipeline's RunState once it exists

        def fetch_codes(index: int) -> None:
            if index < start:
                _load_layer_codes(part, index, saved, adapter, holder["state"])

        streamer.on_fetch = fetch_codes

        def release(index: int) -> None:
            # a layer finished by an in-memory session has no shard yet: written now, from the same
            # codes and the same rotated layer (so bit-identical to writing it when it finished)
            if index < start and ctx.is_main:
                from rsq.checkpoint.save import layer_shard_name, write_layer_shard

                if not (part / layer_shard_name(index, n_layers)).is_file():
                    write_layer_shard(
                        layers[index], index, adapter.layers, n_layers, holder["state"].results, cfg, part
                    )
            _drop_layer_codes(index, adapter, holder["state"])

        streamer.on_release = release
    t_quant = time.perf_counter()

    def on_done(index: int, st: RunState) -> None:
        _check_losses(index, st, adapter.layers)
        session["layers_quantized"].append(index)
        timings["quantize"] = time.perf_counter() - t_quant
        timings["total"] = time.perf_counter() - t_start
        if ctx.is_main:
            if streamer is not None:  # the checkpoint's shard first: state.json then says it is there
                from rsq.checkpoint.save import write_layer_shard

                write_layer_shard(layers[index], index, adapter.layers, n_layers, st.results, cfg, part)
            _save_layer(part, index, st, cfg, adapter.layers, earlier + [session], streamed=streamer is not None)
        if stop_after_layer is not None and index >= stop_after_layer:
            raise _Interrupted(index)

    evals = None
    if streamer is not None:
        state = state if state is not None else RunState()
        holder["state"] = state
        if ctx.is_main:
            from rsq.pipeline import EvalPass

            evals = {s: EvalPass(w, memory["ppl_batch_size"]) for s, w in eval_wins.items()}
    t0 = time.perf_counter()
    if not cfg.quantizes:
        state = RunState()
    elif start >= n_layers and streamer is None:
        log.info("every layer was finished before: straight to evaluation and saving")
        restore_finished(model, run_cfg, state, adapter=adapter, rotation=plan)
    else:
        weight_fn = None
        if cfg.importance.strategy != "uniform":
            from rsq.importance.layer import make_weight_fn

            weight_fn = make_weight_fn(cfg, adapter, model.config, windows)
        state = quantize_layers(
            model,
            run_cfg,
            windows,
            adapter=adapter,
            state=state,
            start_layer=start,
            on_layer_done=on_done,
            progress=(lambda i, n, msg: progress("quantize", i, n)) if progress and ctx.is_main else None,
            weight_fn=weight_fn,
            dist_ctx=ctx,
            rotation=plan,
            streamer=streamer,
            evals=None if evals is None else list(evals.values()),
        )
    timings["quantize"] = time.perf_counter() - t0
    host_peaks["quantize"] = measured_peak_gib()
    rotation_record = None
    if cfg.rotation.enabled:
        rotation_record = plan.record if plan is not None else plan_rotation(model, adapter, cfg.rotation).record
        # the rotation ran inside the pipeline: report it as its own stage
        inner = state.timings.get("rotate", 0.0)
        timings["rotate"] = timings.get("rotate", 0.0) + inner
        timings["quantize"] -= inner

    if not ctx.is_main:
        ctx.barrier()  # rank 0 evaluates and writes the checkpoint
        return None
    ppl = {}
    t0 = time.perf_counter()
    for source, wins in eval_wins.items():
        if evals is not None:  # the windows went through the layers beside the calibration
            from rsq.eval.perplexity import nll_to_perplexity, store_nll

            ev = evals[source]
            ppl[source] = nll_to_perplexity(store_nll(model, adapter, ev.store, wins, device, ev.batch_size))
            ev.store.close()
        else:
            ppl[source] = perplexity(
                model,
                wins,
                device,
                memory["ppl_batch_size"],
                progress=(lambda i, n: progress("perplexity", i, n)) if progress else None,
            )
            model.to("cpu")
        _check_ppl(ppl[source], source, cfg)
    timings["perplexity"] = time.perf_counter() - t0
    host_peaks["perplexity"] = measured_peak_gib()

    from rsq.checkpoint import save_checkpoint

    t0 = time.perf_counter()
    if streamer is None:  # shards of an earlier streamed session of this run (resumed in memory)
        for stale in part.glob("model-*-of-*.safetensors"):
            stale.unlink()
    save_checkpoint(model, tokenizer, part, cfg, state, rotation_record, streamed=n_layers if streamer else None)
    timings["save"] = time.perf_counter() - t0
    host_peaks["save"] = measured_peak_gib()
    timings["total"] = time.perf_counter() - t_start
    sessions = earlier + [session]
    all_timings = _sum_timings(sessions)

    online = cfg.rotation.online if cfg.rotation.enabled else None
    # relative losses where recorded, else raw ones at their own threshold (rsq/loss_outliers.py)
    rel = bool(state.layers) and all(getattr(r, "rel_losses", None) for r in state.layers)
    ratio = REL_RATIO if rel else RAW_RATIO
    outliers = find_loss_outliers(((r.index, r.rel_losses if rel else r.losses) for r in state.layers), ratio)
    if outliers:
        log.warning(outlier_line(outliers, adapter.layers, cfg.method, online, ratio))
    results = {
        "model": describe_source(cfg.model or None),
        "method": cfg.method,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": versions(),
        "device": str(device),
        "calibration": {**calib_record, "windows": list(windows.shape), "tokens": int(calib_ids.numel())},
        "perplexity": {"seqlen": ppl_seqlen, "max_windows": ppl_max_windows, **ppl},
        "rotation": rotation_record,
        # summed over the sessions of the run (a resumed run has several; "sessions" says who did what)
        "timings": {**all_timings, "stages": state.timings, "sessions": sessions},
        "gpu_peak_GiB": state.gpu_peaks,  # stage -> the run's peak GPU memory up to it (empty on CPU)
        "host_memory": {**memory, "measured_peak_GiB": measured_peak_gib(), "measured_by_stage_GiB": host_peaks},
        "streamed": streamer is not None,  # layer by layer from the source's safetensors files
        "layers": [vars(r) for r in state.layers],
        "modules": {k: {"loss": r.loss, "damp": r.damp} for k, r in state.results.items()},
        # modules whose loss is > ratio x the median of the same linear in the other layers
        "loss_outliers": [{**e, "module": f"{adapter.layers}.{e['layer']}.{e['name']}"} for e in outliers],
        "loss_outlier_rule": {"values": "relative" if rel else "raw", "ratio": ratio},
        "num_layers": n_layers,
        "resumed_after_layers": start,  # layers taken from an earlier, interrupted run (--resume)
        "ranks": ctx.world,
    }
    if state.importance_maps:
        save_file(
            {f"layer.{i}": w.contiguous() for i, w in state.importance_maps.items()},
            str(part / "importance.safetensors"),
        )
    (part / "results.json").write_text(jsonsafe.dumps(results, indent=2))
    for leftover in list(part.glob("layer-*.safetensors")) + [part / STATE_FILE]:
        leftover.unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(part, out)
    ctx.barrier()
    return results


def measured_peak_gib() -> float:
    """This process's peak resident memory so far (ru_maxrss; KiB on Linux), GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


class _Interrupted(Exception):
    """Raised by the testing aid ``stop_after_layer`` to simulate a killed run."""
