"""One quantization job with its output directory: atomic writes, resume, results.json.

The output is built in ``<out>.partial/`` next to ``<out>`` and renamed into place only when
complete. After every finished layer the partial directory holds that layer's quantized tensors and
``state.json``; ``resume=True`` reloads them, replays the finished layers forward (cheap) and
continues, which gives the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
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
from rsq.calib.datasets import eval_windows, load_text, sample_windows, tokenize
from rsq.checkpoint.schema import dequantize_result
from rsq.config import RSQConfig
from rsq.distributed import DistContext, rank_device
from rsq.errors import CheckpointFormatError, ConfigError, RSQError
from rsq.eval.perplexity import perplexity
from rsq.loading import describe_source, load_model
from rsq.models.registry import resolve
from rsq.pipeline import DTYPES, LayerReport, RunState, quantize_layers, resolve_device
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


def prepare_output(out: Path, resume: bool, overwrite: bool) -> tuple[Path, dict | None]:
    """Check the destination; return the partial directory and the resume state (if any)."""
    if out.exists() and not overwrite:
        raise ConfigError(f"output directory {out} already exists: pass --overwrite or choose another --out")
    part = partial_dir(out)
    if resume and (part / STATE_FILE).is_file():
        try:
            return part, json.loads((part / STATE_FILE).read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointFormatError(f"{part / STATE_FILE} is corrupt ({exc}): delete {part} and rerun") from exc
    if resume:
        log.warning("--resume: no unfinished run in %s, starting from the beginning", part)
    if part.exists():
        shutil.rmtree(part)
    part.mkdir(parents=True)
    return part, None


def can_resume(out: Path, cfg: RSQConfig) -> bool:
    """Whether ``out`` has an unfinished run of exactly ``cfg`` that ``resume=True`` would continue."""
    state = partial_dir(out) / STATE_FILE
    try:
        return json.loads(state.read_text())["config"] == cfg.to_dict()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _save_layer(part: Path, index: int, state: RunState, cfg: RSQConfig, prefix: str) -> None:
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
    }
    tmp = part / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, part / STATE_FILE)


def _load_layers(part: Path, saved: dict, model, cfg: RSQConfig) -> RunState:
    if saved["config"] != cfg.to_dict():
        raise ConfigError(
            f"--resume: the unfinished run in {part} used different options; rerun with the same options "
            "or without --resume"
        )
    adapter = resolve(model)
    layers = adapter.get_layers(model)
    state = RunState(timings=dict(saved.get("timings", {})))
    for rec in saved["layers"]:
        state.layers.append(LayerReport(**rec))
    for index in range(saved["finished_layers"]):
        path = part / f"layer-{index:04d}.safetensors"
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises several types for truncated files
            raise CheckpointFormatError(f"{path} is unreadable ({exc}): delete {part} and rerun") from exc
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
            module = layers[index].get_submodule(name)
            module.weight.data = dequantize_result(res, cfg.grid).to(module.weight.dtype)
            state.results[full] = res
    return state


def run_quantize(
    cfg: RSQConfig,
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    ppl_sources: tuple[str, ...] = ("wikitext2",),
    ppl_seqlen: int = 512,
    ppl_max_windows: int | None = 40,
    progress: Callable[[str, int, int], None] | None = None,
    stop_after_layer: int | None = None,
    preloaded: tuple | None = None,
    dist_ctx: DistContext | None = None,
    calibration: torch.Tensor | None = None,
) -> dict | None:
    """Quantize ``cfg.model`` as ``cfg`` says, evaluate perplexity, write ``out``. Returns results.

    ``stop_after_layer`` (testing aid) ends the run after that layer as if it had been killed.
    ``preloaded`` = (model, tokenizer) skips loading (the model is modified in place: pass a copy).
    ``dist_ctx``: with several ranks (torchrun), only rank 0 touches the output directory.
    ``calibration``: token ids instead of ``cfg.calib.source``'s text: (N, T) windows used as they
    are, or a 1-D token stream sampled into ``cfg.calib`` windows.
    """
    ctx = dist_ctx or DistContext()
    out = Path(out)
    part, saved, problem = partial_dir(out), None, None
    if ctx.is_main:
        try:
            part, saved = prepare_output(out, resume, overwrite)
        except RSQError as exc:
            problem = exc
    problem_text, saved = ctx.broadcast_object((None if problem is None else str(problem), saved), 0)
    if problem is not None:
        raise problem
    if problem_text is not None:
        raise ConfigError(problem_text)
    try:
        return _run(
            cfg,
            out,
            part,
            saved,
            ppl_sources,
            ppl_seqlen,
            ppl_max_windows,
            progress,
            stop_after_layer,
            preloaded,
            ctx,
            calibration,
        )
    except Exception:
        if ctx.is_main and not (part / STATE_FILE).exists():
            shutil.rmtree(part, ignore_errors=True)  # nothing resumable: leave no half-written output
        raise


def _run(
    cfg,
    out,
    part,
    saved,
    ppl_sources,
    ppl_seqlen,
    ppl_max_windows,
    progress,
    stop_after_layer,
    preloaded,
    ctx: DistContext,
    calibration: torch.Tensor | None = None,
) -> dict | None:
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    run_cfg = replace(cfg, device=rank_device(ctx, cfg.device)) if ctx.enabled else cfg
    device = resolve_device(run_cfg.device)

    t0 = time.perf_counter()
    if preloaded is not None:
        model, tokenizer = preloaded
    else:
        model, tokenizer = load_model(cfg.model or None, DTYPES[cfg.dtype])
    timings["load"] = time.perf_counter() - t0
    adapter = resolve(model)
    first = adapter.get_layers(model)[0]
    for name in adapter.linears:
        cfg.grid.check_width(first.get_submodule(name).in_features, name)

    rotation_record = None
    if cfg.rotation.enabled:
        from rsq.rotation import rotate_model

        t0 = time.perf_counter()
        rotation_record = rotate_model(model, adapter, cfg.rotation)
        timings["rotate"] = time.perf_counter() - t0

    if calibration is None:
        texts = load_text(cfg.calib.source, cfg.calib.data_dir)
        calib_ids = tokenize(tokenizer, texts.calib)
        windows = sample_windows(calib_ids, cfg.calib.nsamples, cfg.calib.seqlen, cfg.seed)
        calib_record = texts.description
    else:
        texts, calib_ids = None, calibration.long()
        windows = calib_ids
        if calib_ids.dim() == 1:
            windows = sample_windows(calib_ids, cfg.calib.nsamples, cfg.calib.seqlen, cfg.seed)
        calib_record = {"source": "tokens passed to rsq.quantize", "shape": list(calib_ids.shape)}

    state, start = None, 0
    if saved is not None:
        state = _load_layers(part, saved, model, cfg)
        start = saved["finished_layers"]
        log.info("resuming after %d finished layers", start)

    n_layers = len(adapter.get_layers(model))

    def on_done(index: int, st: RunState) -> None:
        if ctx.is_main:
            _save_layer(part, index, st, cfg, adapter.layers)
        if stop_after_layer is not None and index >= stop_after_layer:
            raise _Interrupted(index)

    weight_fn = None
    if cfg.importance.strategy != "uniform":
        from rsq.importance.layer import make_weight_fn

        weight_fn = make_weight_fn(cfg, adapter, model.config, windows)

    t0 = time.perf_counter()
    if not cfg.quantizes:
        state = RunState()
    else:
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
        )
    timings["quantize"] = time.perf_counter() - t0

    if not ctx.is_main:
        ctx.barrier()  # rank 0 evaluates and writes the checkpoint
        return None
    ppl = {}
    t0 = time.perf_counter()
    for source in ppl_sources:
        same = texts is not None and source == cfg.calib.source
        eval_text = texts.eval if same else load_text(source, cfg.calib.data_dir).eval
        wins = eval_windows(tokenize(tokenizer, eval_text), ppl_seqlen, ppl_max_windows)
        ppl[source] = perplexity(
            model, wins, device, progress=(lambda i, n: progress("perplexity", i, n)) if progress else None
        )
        model.to("cpu")
    timings["perplexity"] = time.perf_counter() - t0

    from rsq.checkpoint import save_checkpoint

    t0 = time.perf_counter()
    save_checkpoint(model, tokenizer, part, cfg, state, rotation_record)
    timings["save"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

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
        "timings": {**timings, "stages": state.timings},
        "gpu_peak_GiB": state.gpu_peaks,  # stage -> the run's peak GPU memory up to it (empty on CPU)
        "layers": [vars(r) for r in state.layers],
        "modules": {k: {"loss": r.loss, "damp": r.damp} for k, r in state.results.items()},
        "num_layers": n_layers,
        "resumed_after_layers": start,  # layers taken from an earlier, interrupted run (--resume)
        "ranks": ctx.world,
    }
    if state.importance_maps:
        save_file(
            {f"layer.{i}": w.contiguous() for i, w in state.importance_maps.items()},
            str(part / "importance.safetensors"),
        )
    (part / "results.json").write_text(json.dumps(results, indent=2))
    for leftover in list(part.glob("layer-*.safetensors")) + [part / STATE_FILE]:
        leftover.unlink(missing_ok=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(part, out)
    ctx.barrier()
    return results


class _Interrupted(Exception):
    """Raised by the testing aid ``stop_after_layer`` to simulate a killed run."""
