"""One quantization job: check everything, choose the collaborators once, run the layer loop,
evaluate, save.

    run_quantize(cfg, out, **options)
      prepare   preflight checks, the output location, the streamed-or-not choice, texts, memory plan
      load      a weight source (rsq.job.weights), the tokenizer, the calibration and evaluation windows
      layers    one loop (rsq.job.loop) over the stages (rsq.job.stages), the run store (rsq.job.store)
                keeping resume state and shards in ``<out>.partial/``
      evaluate  perplexity of the quantized model (a streamed model's windows rode along the layers)
      save      checkpoint, results.json, and the rename of ``<out>.partial/`` into ``<out>``
"""

from __future__ import annotations

import logging
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from rsq.calib.datasets import eval_windows, sample_windows, tokenize
from rsq.checkpoint.save import save_checkpoint
from rsq.config import EVAL_SEQLEN, EVAL_WINDOWS, TORCH_DTYPES, RSQConfig
from rsq.distributed import DistContext, rank_device
from rsq.errors import ConfigError, NonFiniteError, RSQError
from rsq.eval.perplexity import nll_to_perplexity, perplexity, store_nll
from rsq.importance.layer import make_weight_fn
from rsq.io.loading import describe_source, load_config
from rsq.io.streaming import open_streamed, streamable
from rsq.job.loop import run_layers
from rsq.job.stages import (
    Calibration,
    EvalPass,
    EvalPropagate,
    NoActivations,
    Propagate,
    QuantizeLayer,
    RestoreFinished,
    RotateLayers,
    Stage,
)
from rsq.job.state import RunState
from rsq.job.store import STATE_FILE, RunStore, _Interrupted, can_resume, check_output, partial_dir
from rsq.job.weights import open_weights
from rsq.log import LayerLog, eval_done, gpu_peak_gib, host_peak_gib
from rsq.loss_outliers import RAW_RATIO, REL_RATIO, find_loss_outliers, outlier_line
from rsq.models.adapter import ModelAdapter
from rsq.models.device import resolve_device
from rsq.plan import preflight
from rsq.plan.memory import JobShape, fit_device_memory, fit_host_memory
from rsq.rotation.pad import padded_config
from rsq.rotation.rotate import apply_rotation, plan_rotation
from rsq.version import __version__

log = logging.getLogger(__name__)

__all__ = ["STATE_FILE", "JobOptions", "_Interrupted", "can_resume", "partial_dir", "run_quantize"]


@dataclass
class JobOptions:
    """run_quantize's options besides the RSQConfig (each also a keyword of run_quantize).

    ``ppl_batch_size``: windows per evaluation forward (None: the most, up to 4, that the memory
    plan fits). ``force_seqlen``: allow window lengths beyond the model's context. ``check_memory``:
    refuse a job whose predicted peak host memory exceeds what is available (CPU runs).
    ``stop_after_layer`` (testing aid) ends the run after that layer as if it had been killed.
    ``preloaded`` = (model, tokenizer) skips loading (the model is modified in place: pass a copy).
    ``dist_ctx``: with several ranks (torchrun), only rank 0 touches the output directory.
    ``calibration``: token ids instead of ``cfg.calib.source``'s text: (N, T) windows used as they
    are, or a 1-D token stream sampled into ``cfg.calib`` windows.
    ``stream``: read the model layer by layer from its safetensors files and write each finished
    layer's shard as it finishes (rsq.io.streaming), so host memory does not grow with the model;
    None (default) streams a local safetensors directory, False loads the whole model (the only
    path for GGUF files, hub ids and quantized sources), True refuses a source that cannot stream.
    ``overlap_io``: a streamed model's next layer is read, and each finished layer's files are
    written, on background threads while the device works (False: in the loop, one after the other;
    the same files either way). The environment variable RSQ_OVERLAP_IO=0 turns it off too."""

    resume: bool = False
    overwrite: bool = False
    ppl_sources: tuple[str, ...] = ("wikitext2",)
    ppl_seqlen: int = EVAL_SEQLEN
    ppl_max_windows: int | None = EVAL_WINDOWS
    ppl_batch_size: int | None = None
    force_seqlen: bool = False
    check_memory: bool = True
    progress: Callable[[str, int, int], None] | None = None
    stop_after_layer: int | None = None
    preloaded: tuple | None = None
    dist_ctx: DistContext | None = None
    calibration: torch.Tensor | None = None
    stream: bool | None = None
    overlap_io: bool = True

    def __post_init__(self) -> None:
        self.ppl_sources = tuple(self.ppl_sources)
        self.overlap_io = self.overlap_io and os.environ.get("RSQ_OVERLAP_IO", "1") != "0"
        self.dist_ctx = self.dist_ctx or DistContext()

    @property
    def eval_seqlen(self) -> int | None:
        return self.ppl_seqlen if self.ppl_sources else None


@dataclass
class Job:
    """A job's choices, made once before its first layer."""

    cfg: RSQConfig  # as given: written to state.json and the checkpoint
    opts: JobOptions
    store: RunStore
    streamed: tuple | None  # (skeleton, checked source) of a streamed model
    texts: dict
    memory: dict
    adapter: ModelAdapter  # the model family's, looked up once (preflight.check_model)
    run_cfg: RSQConfig = None  # this rank's device (several ranks: one GPU each)
    device: torch.device | None = None
    windows: torch.Tensor | None = None  # (N, T) calibration token ids
    calib_record: dict = field(default_factory=dict)
    eval_wins: dict[str, torch.Tensor] = field(default_factory=dict)  # source -> (K, T) windows
    timings: dict[str, float] = field(default_factory=dict)
    host_peaks: dict[str, float] = field(default_factory=dict)  # stage -> peak RSS up to its end
    # seconds before _execute: "before_job" (the process's age when run_quantize was called: interpreter
    # start, imports and argument parsing for the CLI; the caller's own work before it for the library)
    # and "preflight" (_prepare's checks: config, file headers, texts, memory plans, CUDA start-up)
    early: dict[str, float] = field(default_factory=dict)


def run_quantize(cfg: RSQConfig, out: Path, options: JobOptions | None = None, **keywords) -> dict | None:
    """Quantize ``cfg.model`` as ``cfg`` says, evaluate perplexity, write ``out``. Returns results
    (None on ranks other than the main one). ``options`` or the same as keywords: :class:`JobOptions`.

    Everything that can be checked before the work is checked first (rsq.plan.preflight): bad
    input raises an RSQError and creates nothing."""
    opts = options or JobOptions(**keywords)
    before_job, t_call = process_age(), time.perf_counter()
    cfg = cfg.resolved()  # "auto" choices made once: the run executes and records the resolved config
    job = _prepare(cfg, Path(out), opts)
    job.early = {"preflight": time.perf_counter() - t_call}
    if before_job is not None:
        job.early["before_job"] = before_job
    try:
        job.store.create()
        return _execute(job)
    except BaseException:  # errors and interrupts (SIGINT/SIGTERM) alike
        job.store.discard_unresumable()
        raise


def _prepare(cfg: RSQConfig, out: Path, opts: JobOptions) -> Job:
    """Every check that needs no weights, in order; nothing is created."""
    ctx = opts.dist_ctx
    preflight.check_lengths(
        ppl_seqlen=opts.eval_seqlen, ppl_max_windows=opts.ppl_max_windows, ppl_batch_size=opts.ppl_batch_size
    )
    device = resolve_device(rank_device(ctx, cfg.device) if ctx.enabled else cfg.device)
    if ctx.enabled and cfg.importance.unrotated_outliers == "keep-float":
        raise ConfigError(
            f"--unrotated-outliers {cfg.importance.unrotated_outliers} decides from every calibration token at once "
            "and runs in one process: drop --nproc (or use --unrotated-outliers off)"
        )
    saved = _check_output_on_main(out, cfg, opts)
    config = opts.preloaded[0].config if opts.preloaded is not None else load_config(cfg.model or None)
    adapter = preflight.check_model(config, cfg, ppl_seqlen=opts.eval_seqlen, force_seqlen=opts.force_seqlen)
    # a resume may change the mode: the finished layers' codes are in layer-*.safetensors either way
    stream_path = choose_stream(cfg, opts.stream, opts.preloaded)
    streamed = None  # the files' headers are checked against the config: before any output exists
    if stream_path is not None:
        streamed = open_streamed(stream_path, config, adapter, TORCH_DTYPES[cfg.dtype])
    texts = preflight.load_sources(cfg, opts.ppl_sources, calib=opts.calibration is None)
    shape = JobShape(
        ppl_seqlen=opts.eval_seqlen,
        ppl_batch_size=opts.ppl_batch_size,
        ppl_windows=opts.ppl_max_windows if opts.ppl_sources else 0,
        streamed=streamed is not None,
        preloaded=opts.preloaded is not None,
        text_chars=_text_chars(texts, cfg.calib.source, opts.ppl_sources),
    )
    planned = padded_config(config, cfg.rotation)  # --pad-mlp: the memory of the padded MLP
    memory = fit_host_memory(planned, adapter, cfg, shape, device=device, ranks=ctx.world, enforce=opts.check_memory)
    shape = replace(shape, ppl_batch_size=memory["ppl_batch_size"])
    # a GPU job beyond the device's free memory stops here
    memory["device_memory"] = fit_device_memory(planned, adapter, cfg, shape, device=device, enforce=opts.check_memory)
    store = RunStore(out, cfg, saved, writer=ctx.is_main, background=opts.overlap_io)
    store.stop_after = opts.stop_after_layer
    return Job(cfg, opts, store, streamed, texts, memory, adapter)


def _check_output_on_main(out: Path, cfg: RSQConfig, opts: JobOptions) -> dict | None:
    """The main rank checks the destination; every rank gets its verdict and the resume state."""
    ctx = opts.dist_ctx
    saved, problem = None, None
    if ctx.is_main:
        try:
            saved = check_output(out, cfg, opts.resume, opts.overwrite)
        except RSQError as exc:
            problem = exc
    problem_text, saved = ctx.broadcast_object((None if problem is None else str(problem), saved), 0)
    if problem is not None:
        raise problem
    if problem_text is not None:
        raise ConfigError(problem_text)
    return saved


def choose_stream(cfg: RSQConfig, stream: bool | None, preloaded) -> Path | None:
    """The directory a run streams its model from, or None for the in-memory path. ``stream``:
    None decides (a local safetensors directory and a quantizing method stream), False never
    streams, True insists (ConfigError where it cannot)."""
    path = streamable(cfg.model or None) if preloaded is None and cfg.quantizes and stream is not False else None
    if stream and path is None:
        raise ConfigError(
            f"streaming needs a quantizing method and a local directory of safetensors weights (config.json + "
            f"model.safetensors or an index), not {cfg.model or 'the embedded GGUF model'!r}: drop the stream "
            "option to load the model into memory"
        )
    return path


def _text_chars(texts: dict, calib_source: str, ppl_sources) -> int:
    """Characters of all the text the job tokenizes (lazily read c4 shards count as 0)."""
    sizes = [len(t._calib) for s, t in texts.items() if s == calib_source and isinstance(t._calib, str)]
    sizes += [len(t._eval) for s, t in texts.items() if s in ppl_sources and isinstance(t._eval, str)]
    return sum(sizes)


def _execute(job: Job) -> dict | None:
    t_start = time.perf_counter()
    cfg, ctx = job.cfg, job.opts.dist_ctx
    job.timings = job.store.session.timings
    job.timings.update(job.early)
    seed_everything(cfg.seed)
    job.run_cfg = replace(cfg, device=rank_device(ctx, cfg.device)) if ctx.enabled else cfg
    job.device = resolve_device(job.run_cfg.device)
    t0 = time.perf_counter()
    adapter = job.adapter
    model, tokenizer, weights = open_weights(cfg, adapter, job.opts.preloaded, job.streamed, job.opts.overlap_io)
    try:  # the layer loop closes the weight source; a failure before it must too (a read in flight)
        job.timings["load"] = time.perf_counter() - t0
        job.host_peaks["load"] = host_peak_gib()
        first = adapter.get_layers(model)[0]
        for name in adapter.linears:
            cfg.grid.check_width(first.get_submodule(name).in_features, name)
        t0 = time.perf_counter()
        _windows(job, tokenizer)
        job.timings["tokenize"] = time.perf_counter() - t0
        plan = _rotation(job, model, adapter)
        job.store.attach(adapter, adapter.get_layers(model), weights.streamed)
        job.store.session.clock(t_start)
        state, evals = _quantize(job, model, adapter, weights, plan)
    finally:
        weights.close()
    rotation_record = None
    if cfg.rotation.enabled:
        rotation_record = plan.record
    if not ctx.is_main:
        ctx.barrier()  # rank 0 evaluates and writes the checkpoint
        return None
    ppl = _evaluate(job, model, adapter, evals)
    t0 = time.perf_counter()
    job.store.drop_stale_shards()
    n_layers = len(adapter.get_layers(model))
    streamed_layers = n_layers if weights.streamed else None
    save_checkpoint(
        model, tokenizer, job.store.part, cfg, state, rotation_record, streamed=streamed_layers, adapter=adapter
    )
    job.timings["save"] = time.perf_counter() - t0
    job.host_peaks["save"] = host_peak_gib()
    job.timings["total"] = time.perf_counter() - t_start
    results = _results(job, state, ppl, rotation_record, weights.streamed, adapter.layers)
    job.store.finalize(results, state.importance_maps)
    ctx.barrier()
    return results


def _windows(job: Job, tokenizer) -> None:
    """The calibration windows, their record and the evaluation windows per source: every text is
    tokenized and windowed before the first layer, so a too-short text fails now."""
    cfg, opts = job.cfg, job.opts
    if opts.calibration is None:
        calib_text = job.texts[cfg.calib.source]
        calib_ids = tokenize(tokenizer, calib_text.calib)
        windows = sample_windows(calib_ids, cfg.calib.nsamples, cfg.calib.seqlen, cfg.seed)
        record = calib_text.description
    else:
        calib_ids = windows = opts.calibration.long()
        if calib_ids.dim() == 1:
            windows = sample_windows(calib_ids, cfg.calib.nsamples, cfg.calib.seqlen, cfg.seed)
        record = {"source": "tokens passed to rsq.quantize", "shape": list(calib_ids.shape)}
    job.windows = windows
    job.calib_record = {**record, "windows": list(windows.shape), "tokens": int(calib_ids.numel())}
    job.eval_wins = {
        s: eval_windows(tokenize(tokenizer, job.texts[s].eval), opts.ppl_seqlen, opts.ppl_max_windows)
        for s in opts.ppl_sources
    }


def _rotation(job: Job, model, adapter):
    """The rotation plan (None: no rotation): a quantizing run applies it layer by layer, an
    unquantized run's whole-model rotation is done now."""
    if not job.cfg.rotation.enabled:
        return None
    t0 = time.perf_counter()
    plan = plan_rotation(model, adapter, job.cfg.rotation)
    if not job.cfg.quantizes:  # else applied layer by layer on the device as the loop reaches them
        apply_rotation(model, adapter, plan)
    job.timings["rotate"] = time.perf_counter() - t0
    return plan


def _quantize(job: Job, model, adapter, weights, plan) -> tuple[RunState, dict[str, EvalPass] | None]:
    """The layer loop with this job's stages; (state, the evaluation windows that rode along)."""
    cfg, ctx, store = job.cfg, job.opts.dist_ctx, job.store
    state = store.load_state()
    evals = None
    if weights.streamed and ctx.is_main:
        evals = {s: EvalPass(w, job.memory["ppl_batch_size"]) for s, w in job.eval_wins.items()}
    t0 = time.perf_counter()
    if cfg.quantizes:
        stages = _stages(job, model, adapter, plan, state, None if evals is None else list(evals.values()))
        run_layers(
            model,
            adapter,
            weights,
            stages,
            store,
            state,
            job.device,
            _layer_reporter(job, state, len(adapter.get_layers(model))),
        )
    job.timings["quantize"] = time.perf_counter() - t0
    job.host_peaks["quantize"] = host_peak_gib()
    if cfg.rotation.enabled:  # the rotation ran inside the loop: report it as its own stage
        inner = state.timings.get("rotate", 0.0)
        job.timings["rotate"] = job.timings.get("rotate", 0.0) + inner
        job.timings["quantize"] -= inner
    return state, evals


def _layer_reporter(job: Job, state: RunState, n_layers: int):
    """After each layer: the progress bar, and one log line per layer quantized in this session (rsq.log)."""
    if not job.opts.dist_ctx.is_main:
        return None
    progress, start = job.opts.progress, job.store.start
    layer_log = LayerLog(n_layers, start, state.timings)

    def report(done: int, total: int, what: str) -> None:
        if done - 1 >= start:
            layer_log.layer_done(done - 1, state)
        if progress is not None:
            progress("quantize", done, total)

    return report


def _stages(job: Job, model, adapter, plan, state: RunState, evals: list[EvalPass] | None) -> list[Stage]:
    """Chosen once: rotate (planned), restore (resumed), quantize + propagate (unless every layer
    was finished before), evaluation windows (streamed)."""
    cfg, run_cfg, ctx, store = job.cfg, job.run_cfg, job.opts.dist_ctx, job.store
    stages: list[Stage] = []
    if plan is not None:
        stages.append(RotateLayers(plan, adapter, job.device, state))
    if store.start > 0:
        stages.append(RestoreFinished(store, adapter, run_cfg, state))
    if store.start < len(adapter.get_layers(model)):
        weight_fn = None
        if cfg.importance.strategy != "uniform":
            weight_fn = make_weight_fn(cfg, adapter, model.config, job.windows)
        if cfg.solver.algorithm == "rtn" and weight_fn is None:  # reads no activation: none are computed
            stages.append(QuantizeLayer(NoActivations(run_cfg, adapter), state, ctx, None, store.start))
        else:
            calib = Calibration(run_cfg, job.windows, adapter, ctx, model)
            stages += [QuantizeLayer(calib, state, ctx, weight_fn, store.start), Propagate(calib, state)]
    else:
        log.info("every layer was finished before: straight to evaluation and saving")
    if evals:
        stages.append(EvalPropagate(evals, adapter, job.device, state))
    return stages


def _evaluate(job: Job, model, adapter, evals: dict[str, EvalPass] | None) -> dict[str, float]:
    """Perplexity per source: from the hidden states that rode along the layers (streamed), or a
    forward pass of the whole quantized model."""
    ppl, progress = {}, job.opts.progress
    t0 = time.perf_counter()
    for source, wins in job.eval_wins.items():
        t_source = time.perf_counter()
        if evals is not None:  # the windows went through the layers beside the calibration
            ev = evals[source]
            ppl[source] = nll_to_perplexity(store_nll(model, adapter, ev.store, wins, job.device, ev.batch_size))
            ev.store.close()
        else:
            ppl[source] = perplexity(
                model,
                wins,
                job.device,
                job.memory["ppl_batch_size"],
                progress=(lambda i, n: progress("perplexity", i, n)) if progress else None,
            )
            model.to("cpu")
        _check_ppl(ppl[source], source, job.cfg)
        eval_done(source, ppl[source], wins.shape[0], wins.shape[1], time.perf_counter() - t_source)
    job.timings["perplexity"] = time.perf_counter() - t0
    job.host_peaks["perplexity"] = host_peak_gib()
    return ppl


def _loss_outliers(cfg: RSQConfig, state: RunState, prefix: str) -> tuple[list[dict], dict]:
    """Modules whose loss is far above the same linear's in the other layers (rsq/loss_outliers.py):
    relative losses where every layer recorded them, else raw ones at their own threshold; one
    warning line naming the modules, the setting and what to use instead."""
    online = cfg.rotation.online if cfg.rotation.enabled else None
    rel = bool(state.layers) and all(getattr(r, "rel_losses", None) for r in state.layers)
    ratio = REL_RATIO if rel else RAW_RATIO
    outliers = find_loss_outliers(
        ((r.index, _quantized(r, r.rel_losses if rel else r.losses)) for r in state.layers), ratio
    )
    if outliers:
        log.warning(outlier_line(outliers, prefix, cfg.method, online, ratio))
    entries = [{**e, "module": f"{prefix}.{e['layer']}.{e['name']}"} for e in outliers]
    return entries, {"values": "relative" if rel else "raw", "ratio": ratio}


def _quantized(report, values: dict) -> dict:
    """``values`` without the linears the layer kept unquantized (a zero loss is no peer's loss)."""
    sites = getattr(report, "sites", None) or {}
    return {k: v for k, v in values.items() if not sites.get(k, {}).get("kept")}


def _kept_float(cfg: RSQConfig, state: RunState, prefix: str) -> list[dict]:
    """The linears --unrotated-outliers keep-float left unquantized, with the statistic that chose
    them (rsq/importance/sites.py); one log line when there are any."""
    kept = [
        {"module": f"{prefix}.{r.index}.{name}", **{k: v for k, v in rec.items() if k != "kept"}}
        for r in state.layers
        for name, rec in (getattr(r, "sites", None) or {}).items()
        if rec.get("kept")
    ]
    by_peak = [e for e in kept if e.get("rule") != "loss"]
    by_loss = [e for e in kept if e.get("rule") == "loss"]
    if by_peak:
        log.warning(
            "kept in %s (not quantized), input channel peak over %gx the median channel's: %s",
            cfg.dtype,
            cfg.importance.outlier_ratio,
            ", ".join(f"{e['module']} ({e['channel_peak']:.0f}x)" for e in by_peak),
        )
    if by_loss:
        log.warning(
            "kept in %s (not quantized): no online rotation reaches their input and their GPTQ loss was over "
            "%gx their layer's other linears' (--unrotated-outliers keep-float-on-loss): %s",
            cfg.dtype,
            cfg.importance.outlier_loss_ratio,
            ", ".join(f"{e['module']} ({e['loss_ratio']:.1f}x)" for e in by_loss),
        )
    return kept


def _results(job: Job, state: RunState, ppl: dict, rotation_record: dict | None, streamed: bool, prefix: str) -> dict:
    cfg, store = job.cfg, job.store
    outliers, rule = _loss_outliers(cfg, state, prefix)
    kept = _kept_float(cfg, state, prefix)
    sessions = store.session.all()
    return {
        "model": describe_source(cfg.model or None),
        "method": cfg.method,
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": versions(),
        "device": str(job.device),
        "calibration": job.calib_record,
        "perplexity": {"seqlen": job.opts.ppl_seqlen, "max_windows": job.opts.ppl_max_windows, **ppl},
        "rotation": rotation_record,
        # summed over the sessions of the run (a resumed run has several; "sessions" says who did what)
        "timings": {**_sum_timings(sessions), "stages": state.timings, "sessions": sessions},
        "gpu_peak_GiB": state.gpu_peaks,  # stage -> the run's peak GPU memory up to it (empty on CPU)
        "host_memory": {
            **{k: v for k, v in job.memory.items() if k != "device_memory"},
            "measured_peak_GiB": host_peak_gib(),
            "measured_by_stage_GiB": job.host_peaks,
        },
        # predicted (rsq.plan.memory.device_memory_plan) beside measured (torch's peak allocation; null on CPU)
        "device_memory": {**job.memory["device_memory"], "measured_peak_GiB": gpu_peak_gib()},
        "streamed": streamed,  # layer by layer from the source's safetensors files
        "layers": [vars(r) for r in state.layers],
        "modules": {k: {"loss": r.loss, "damp": r.damp} for k, r in state.results.items()},
        # modules whose loss is > ratio x the median of the same linear in the other layers
        "loss_outliers": outliers,
        "loss_outlier_rule": rule,
        # --unrotated-outliers keep-float: linears left in the model dtype, with their input statistics
        "kept_float": kept,
        "num_layers": len(store.layers),
        "resumed_after_layers": store.start,  # layers taken from an earlier, interrupted run (--resume)
        "ranks": job.opts.dist_ctx.world,
    }


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


def process_age() -> float | None:
    """Seconds since this process started: Linux's /proc (10 ms ticks against /proc/uptime), else
    psutil (whose start time rests on a boot time rounded to the second), else None."""
    try:
        with open("/proc/self/stat") as f:  # field 22 (after the parenthesised name): start, clock ticks after boot
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except ImportError:
        return None


def _sum_timings(sessions: list[dict]) -> dict[str, float]:
    total: dict[str, float] = {}
    for sess in sessions:
        for k, v in sess["timings"].items():
            total[k] = total.get(k, 0.0) + v
    return total


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions() -> dict:
    import transformers

    return {
        "rsq": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
