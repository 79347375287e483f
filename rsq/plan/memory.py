"""`rsq plan`: what a run will do and need, from a model's config alone (no weights).

For every rotation site: the order, the Hadamard recipe or the fallback. Memory for calibration at
N × T tokens: model weights, one decoder layer on the device, calibration activations (sharded over
K ranks), Hessians, attention-importance chunks, and the packed checkpoint size.

Every plan takes the model's config with its family adapter (rsq.models), resolved once by the
caller (the job's preparation, `rsq plan`): the shapes and head counts come from the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rsq.checkpoint.save import MERGE_BELOW
from rsq.config import TORCH_DTYPES, CalibConfig, GridConfig, RSQConfig
from rsq.errors import MemoryBudgetError
from rsq.eval.perplexity import LOGITS_BUDGET, positions_per_chunk
from rsq.models.adapter import ModelAdapter
from rsq.rotation.hadamard import hadamard_kind, has_hadamard

GiB = 1024**3


@dataclass(frozen=True)
class Workload:
    """The calibration, grid and byte sizes :func:`memory_plan` is asked about; the calibration
    and grid default to RSQConfig's (``rsq plan`` asks about 256 x 4096 windows)."""

    nsamples: int = CalibConfig.nsamples
    seqlen: int = CalibConfig.seqlen
    bits: int = GridConfig.bits
    group_size: int = GridConfig.group_size
    batch: int = RSQConfig.batch_size
    ranks: int = 1
    act_bytes: int = 2
    weight_bytes: int = 2
    query_chunk: int = 512


@dataclass(frozen=True)
class JobShape:
    """What the host and device memory plans read about a job besides the model and its RSQConfig.

    ``ppl_seqlen``: evaluation window length (None: no evaluation); ``ppl_batch_size``: windows per
    evaluation forward (None: the most, up to 4, that fits); ``ppl_windows``: the evaluation windows
    whose hidden states ride along a streamed run's layers (None: every window of the text, about 4
    characters a token); ``streamed``: the model is read layer by layer (rsq.io.streaming);
    ``preloaded``: the model came already loaded; ``text_chars``: the characters of all the text
    the job tokenizes."""

    ppl_seqlen: int | None = None
    ppl_batch_size: int | None = None
    ppl_windows: int | None = None
    streamed: bool = False
    preloaded: bool = False
    text_chars: int = 0


@dataclass
class Site:
    name: str
    order: int
    recipe: str


def rotation_plan(config, adapter: ModelAdapter, fallback: str = "skip") -> list[Site]:
    hd, heads = adapter.head_dim(config), adapter.num_heads(config)
    sites = []
    for name, order in (
        ("residual (R1)", config.hidden_size),
        ("down_proj input", config.intermediate_size),
        ("v_proj per head", hd),
        ("o_proj cross-head", heads),
    ):
        if has_hadamard(order):
            recipe = hadamard_kind(order)
        elif name.startswith("residual"):
            recipe = "random orthogonal (no Hadamard of this order)"
        else:
            recipe = f"{'random orthogonal' if fallback == 'random' else 'skipped'} (no Hadamard of order {order})"
        sites.append(Site(name, order, recipe))
    return sites


def param_counts(config, adapter: ModelAdapter) -> dict[str, int]:
    shapes = adapter.linear_shapes(config)
    per_layer = sum(o * i for o, i in shapes.values()) + 2 * config.hidden_size
    qkv, o, mlp = adapter.biases(config)
    biased = ("q_proj", "k_proj", "v_proj") * qkv + ("o_proj",) * o + ("gate_proj", "up_proj", "down_proj") * mlp
    per_layer += sum(shapes[k][0] for k in biased)
    embed = config.vocab_size * config.hidden_size
    head = 0 if getattr(config, "tie_word_embeddings", False) else embed
    return {
        "per_layer": per_layer,
        "linear_per_layer": sum(o * i for o, i in shapes.values()),
        "embed": embed,
        "lm_head": head,
        "total": embed + head + config.num_hidden_layers * per_layer + config.hidden_size,
    }


def memory_plan(config, adapter: ModelAdapter, work: Workload | None = None, **fields) -> dict[str, float]:
    """Bytes (as GiB) per rank for ``work`` (:class:`Workload`; ``fields`` replace some of its
    fields, e.g. ``nsamples=256``). Activations are sharded over ranks; one layer is on each device."""
    w = replace(work or Workload(), **fields)
    nsamples, seqlen, bits, group_size, batch = w.nsamples, w.seqlen, w.bits, w.group_size, w.batch
    ranks, act_bytes, weight_bytes, query_chunk = w.ranks, w.act_bytes, w.weight_bytes, w.query_chunk
    p = param_counts(config, adapter)
    shapes = adapter.linear_shapes(config)
    d, inter = config.hidden_size, config.intermediate_size
    heads = adapter.num_heads(config)
    acts = nsamples * seqlen * d * act_bytes / ranks
    # one Hessian per distinct linear input: qkv (d), o (heads*hd), gate/up (d), down (inter); fp32
    hess = 4 * max(d, inter) ** 2 + 4 * max(d, inter) ** 2  # the accumulating one + the solver's copy
    layer = p["per_layer"] * weight_bytes
    # per batch on the device: layer activations in flight (MLP width dominates) + attention chunk
    inflight = batch * seqlen * (3 * inter + 4 * d) * act_bytes + batch * heads * query_chunk * seqlen * 4
    n_groups = 1 if group_size == -1 else None
    packed = 0.0
    for out_f, in_f in shapes.values():
        groups = n_groups or in_f // group_size
        packed += out_f * in_f * bits / 8 + out_f * groups * (weight_bytes + 1)
    packed = packed * config.num_hidden_layers + (p["embed"] + p["lm_head"]) * weight_bytes
    ends = (p["embed"] + p["lm_head"] + d) * weight_bytes
    # a streamed run (rsq.io.streaming) holds the ends, ~3 layers (the layer at its turn, the next one
    # read ahead into pinned memory, the last finished one's codes and shard with the writer thread)
    # and, where they do not fit the device, the calibration activations
    streamed = ends + 3 * layer + acts + STREAM_OVERHEAD
    return {
        "model_weights_host_GiB": p["total"] * weight_bytes / GiB,
        "layer_on_device_GiB": layer / GiB,
        "calib_activations_per_rank_GiB": acts / GiB,
        "hessians_GiB": hess / GiB,
        "in_flight_GiB": inflight / GiB,
        "device_peak_estimate_GiB": (layer + hess + inflight) / GiB,
        # on the device, the attention output is shared between the calibration passes through a second
        # activation-sized buffer (rsq.job.stages._reuse_cache: measured 24.5 GiB at 8B, bench/NOTES-memory.md)
        "device_peak_if_activations_on_device_GiB": (layer + hess + inflight + 2 * acts) / GiB,
        # where it also fits (rsq.job.stages._down_cache: the layer's working set + this within 80 % of
        # the free memory), the down pass keeps down_proj's inputs for the propagation (all of them, or
        # the first sequences that fit): opportunistic, like the activations on the device, so not in
        # the peaks above; this is the most it takes (30 GB at 8B, 256 x 4096)
        "down_inputs_if_kept_GiB": nsamples * seqlen * inter * act_bytes / ranks / GiB,
        "checkpoint_GiB": packed / GiB,
        "bf16_model_GiB": p["total"] * 2 / GiB,
        "host_in_memory_peak_GiB": (p["total"] * weight_bytes + STREAM_OVERHEAD) / GiB,
        "host_streamed_ends_GiB": ends / GiB,
        "host_streamed_peak_GiB": streamed / GiB,
    }


def format_plan(
    name: str, config, adapter: ModelAdapter, host_GiB: float | None = None, padded_from: int | None = None, **kw
) -> list[str]:
    """`rsq plan`'s lines for one model; ``kw``: :class:`Workload` fields. ``padded_from``: the MLP
    width before --pad-mlp when ``config`` is the padded one (rsq.rotation.pad.padded_config)."""
    p = param_counts(config, adapter)
    padded = f" (padded from {padded_from} by --pad-mlp)" if padded_from else ""
    lines = [
        f"{name}: {p['total'] / 1e9:.2f}B parameters, hidden {config.hidden_size}, intermediate "
        f"{config.intermediate_size}{padded}, {config.num_hidden_layers} layers, heads {config.num_attention_heads}"
        f"/{adapter.num_kv_heads(config)}, "
        f"head_dim {adapter.head_dim(config)}, "
        f"tied embeddings {bool(getattr(config, 'tie_word_embeddings', False))}"
    ]
    for site in rotation_plan(config, adapter):
        lines.append(f"  rotation {site.name:<18} order {site.order:>6}: {site.recipe}")
    mem = memory_plan(config, adapter, **kw)
    for k, v in mem.items():
        lines.append(f"  {k:<42} {v:10.2f}")
    if host_GiB is not None:
        fits = mem["host_streamed_peak_GiB"] <= host_GiB
        whole = mem["host_in_memory_peak_GiB"] <= host_GiB
        lines.append(
            f"  host {host_GiB:g} GiB: streamed from safetensors {'fits' if fits else 'does NOT fit'} "
            f"({mem['host_streamed_peak_GiB']:.1f} GiB, calibration activations offloaded to the host at worst); "
            f"whole model in memory {'fits' if whole else 'does NOT fit'} ({mem['host_in_memory_peak_GiB']:.1f} GiB)"
        )
    return lines


# ----------------------------------------------------------------------------- host memory (CPU jobs)

# resident besides tensors in a streamed or in-memory GPU run: the libraries, the CUDA context's host
# side, the tokenizer and text, pinned staging buffers (an allowance, not a measurement)
STREAM_OVERHEAD = 4 * GiB
LOGITS_COPIES = 3  # a head chunk's logits, their log-softmax and the gathered loss terms
LIBRARIES = 80 * 1024**2  # resident code and tables of the model and tokenizer libraries, imported at load
TOKENIZE_PER_CHAR = 140  # transient bytes of a fast tokenizer's encoding per character of text tokenized,
# which the allocator keeps resident afterwards (calibrated: 86 MiB for the 646k characters of one half of
# WikiText-2 test with a 512-token BPE; bench/NOTES-memory.md)


def _rss_bytes() -> int:
    """This process's resident set now (VmRSS), bytes; 0 where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_bytes() -> int | None:
    """Memory available to a new job: MemAvailable of /proc/meminfo (psutil where installed)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def eval_bytes(config, adapter: ModelAdapter, seqlen: int, batch: int, act_bytes: int = 4) -> int:
    """Working memory of one perplexity forward of ``batch`` windows beyond the weights: the
    residual stream and MLP intermediates of a layer, the attention scores, and the chunked
    log-likelihood (rsq.eval.perplexity bounds a head chunk's logits to LOGITS_BUDGET)."""
    d, inter = config.hidden_size, config.intermediate_size
    heads = adapter.num_heads(config)
    tokens = batch * seqlen
    layer = tokens * (6 * d + 3 * inter) * act_bytes + batch * heads * seqlen * seqlen * 4
    chunk = min(seqlen, positions_per_chunk(batch, config.vocab_size, LOGITS_BUDGET))
    logits = batch * chunk * config.vocab_size * 4 * LOGITS_COPIES
    return layer + logits + tokens * d * 4  # + the kept last hidden states


def host_memory_plan(config, adapter: ModelAdapter, cfg, job: JobShape, *, baseline: int = 0) -> dict[str, int]:
    """Predicted peak resident bytes of a CPU job per stage (each includes ``baseline``, the
    process's resident set before loading): load, quantize, perplexity, save. ``job``: its
    evaluation (``ppl_seqlen``, ``ppl_batch_size``: an int here) and the text it tokenizes
    (``text_chars``). A GGUF source (the embedded default too) is read dequantized to float32 unless
    ``job.preloaded``. ``job.streamed``: the model is read layer by layer (rsq.io.streaming): the
    ends (embeddings, norm, head) stay resident, a decoder layer only during its turn (counted
    three times: the layer with its codes, the next layer read ahead, the last one's shard being
    written; that also covers a float64 rotation copy of one linear), and the ``job.ppl_windows``
    evaluation windows' hidden states ride along the layers; the shards are joined below
    rsq.checkpoint.save.MERGE_BELOW bytes."""
    p = param_counts(config, adapter)
    wb = TORCH_DTYPES[cfg.dtype].itemsize
    model = p["total"] * wb
    d = config.hidden_size
    from_gguf = not job.preloaded and (not cfg.model or str(cfg.model).endswith(".gguf"))
    # loading: transformers holds the checkpoint's tensors (a GGUF file dequantized to float32)
    # beside the model it fills
    stages = {"load": model + (p["total"] * 4 if from_gguf else model)}
    ends = (p["embed"] + p["lm_head"] + d) * wb
    if job.streamed:
        stages["load"] = 2 * ends  # one tensor read beside the ends already read
    codes = 0
    if cfg.quantizes:
        stages["quantize"], codes = _quantize_bytes(config, adapter, cfg, job, p)
    if job.ppl_seqlen is not None:
        work = eval_bytes(config, adapter, job.ppl_seqlen, job.ppl_batch_size)
        stages["perplexity"] = model + codes + work
        if job.streamed:
            stages["perplexity"] = ends + (job.ppl_windows or 0) * job.ppl_seqlen * d * wb + work
    # saving: the checkpoint's tensors, then safetensors' serialised copy of them
    rest = (p["embed"] + p["lm_head"]) * wb
    work = Workload(bits=cfg.grid.bits, group_size=cfg.grid.group_size)
    packed = memory_plan(config, adapter, work)["checkpoint_GiB"] * GiB
    stages["save"] = model + codes + int(packed - (p["embed"] + p["lm_head"]) * 2 + rest) * 2
    if job.streamed:
        stages["save"] = ends + 2 * min(int(packed - (p["embed"] + p["lm_head"]) * 2 + rest), MERGE_BELOW)
    after_tokenizing = baseline + LIBRARIES + TOKENIZE_PER_CHAR * job.text_chars
    return {k: int(v + (baseline + LIBRARIES if k == "load" else after_tokenizing)) for k, v in stages.items()}


def _quantize_bytes(config, adapter: ModelAdapter, cfg, job: JobShape, p: dict) -> tuple[int, int]:
    """(the quantize stage's peak bytes, the uint8 codes kept for an in-memory checkpoint)."""
    wb = TORCH_DTYPES[cfg.dtype].itemsize
    model = p["total"] * wb
    d, inter = config.hidden_size, config.intermediate_size
    heads = adapter.num_heads(config)
    ends = (p["embed"] + p["lm_head"] + d) * wb
    n, t = cfg.calib.nsamples * cfg.importance.expand, cfg.calib.seqlen
    store = n * t * d * wb
    reuse = cfg.solver.algorithm != "rtn" and cfg.importance.expand == 1 and cfg.offload in ("auto", "cpu")
    acts = store * (2 if reuse else 1) if cfg.offload != "disk" and cfg.importance.expand == 1 else 0
    bs = min(cfg.batch_size, n)
    width = max(d, inter)
    hess = 0 if cfg.solver.algorithm == "rtn" else 3 * 4 * width * width
    inflight = bs * t * (3 * inter + 6 * d) * 4 + bs * heads * t * t * 4
    if cfg.importance.strategy == "attncon":
        inflight += 3 * heads * min(cfg.importance.query_chunk, t) * t * 4
    codes = p["linear_per_layer"] * config.num_hidden_layers  # uint8 codes kept for the checkpoint
    peak = model + acts + hess + inflight + codes
    if job.streamed:
        evals = (job.ppl_windows or 0) * (job.ppl_seqlen or 0) * d * wb
        # the layer at its turn, the next one read ahead and the last one's files being written
        # (rsq.io.streaming, rsq.job.store: background reader and writer, one layer each)
        peak = ends + 3 * p["per_layer"] * wb + acts + hess + inflight + evals
        codes = 0
    if cfg.rotation.enabled:
        # rsq.rotation.rotate.rotate_ends: each end (vocab x d) is rotated in float64 (its copy and
        # the product, 16 bytes a weight) beside the model; a tied head is untied first. Measured
        # on a streamed Qwen2.5-0.5B shape (152k vocabulary): 3.6 GiB against 1.7 predicted without it
        untied = 0 if p["lm_head"] else p["embed"] * wb
        base = ends if job.streamed else model
        peak = max(peak, base + untied + 2 * p["embed"] * 8)
    return peak, codes


def _gib(n: float) -> float:
    return round(n / GiB, 3)


def fit_host_memory(
    config, adapter: ModelAdapter, cfg, job: JobShape, *, device, ranks: int = 1, enforce: bool = True
) -> dict:
    """The evaluation batch and the predicted peak host memory of a job; on a CPU job whose
    prediction exceeds the available memory, MemoryBudgetError naming options that fit."""
    baseline = _rss_bytes()
    if job.ppl_windows is None:  # every window of the text: about 4 characters per token
        job = replace(job, ppl_windows=job.text_chars // (4 * job.ppl_seqlen) if job.ppl_seqlen else 0)

    def plan_of(c, seqlen: int | None, batch: int) -> dict[str, int]:
        return host_memory_plan(
            config, adapter, c, replace(job, ppl_seqlen=seqlen, ppl_batch_size=batch), baseline=baseline
        )

    avail = available_bytes()
    batch = job.ppl_batch_size
    if batch is None:  # the most, up to 4, that fits
        batch = 4
        if job.ppl_seqlen is not None and avail is not None:
            while batch > 1 and plan_of(cfg, job.ppl_seqlen, batch)["perplexity"] > avail:
                batch //= 2
    stages = plan_of(cfg, job.ppl_seqlen, batch)
    if job.preloaded:
        stages.pop("load")
    peak = max(stages.values())
    plan = {
        "predicted_peak_GiB": _gib(peak),
        "stages_GiB": {k: _gib(v) for k, v in stages.items()},
        "baseline_GiB": _gib(baseline),
        "available_GiB": None if avail is None else _gib(avail),
        "ppl_batch_size": batch,
        "applies": str(device) == "cpu" and ranks == 1,
        "streamed": job.streamed,
    }
    if enforce and plan["applies"] and avail is not None and peak > avail:
        tips = _host_tips(plan_of, cfg, stages, avail, job.ppl_seqlen, batch)
        raise MemoryBudgetError(
            f"this job needs about {_gib(peak):.1f} GiB of host memory (largest stage: "
            f"{max(stages, key=stages.get)}), but only {_gib(avail):.1f} GiB is available: "
            f"try {', '.join(tips) if tips else 'a machine with more memory'} (or --device cuda on a GPU)"
        )
    return plan


def _smaller_calibration(cfg, fits, divisors: tuple[int, ...]) -> list[str]:
    """The first --nsamples (nsamples / each divisor, then 1) and the first --seqlen (halved,
    quartered, then 128) whose trial config ``fits``."""
    tips = []
    for n in (*(cfg.calib.nsamples // k for k in divisors), 1):
        if 1 <= n < cfg.calib.nsamples and fits(replace(cfg, calib=replace(cfg.calib, nsamples=n))):
            tips.append(f"--nsamples {n}")
            break
    for t in (cfg.calib.seqlen // 2, cfg.calib.seqlen // 4, 128):
        if 2 <= t < cfg.calib.seqlen and fits(replace(cfg, calib=replace(cfg.calib, seqlen=t))):
            tips.append(f"--seqlen {t}")
            break
    return tips


def _shorter_windows(ppl_seqlen: int, fits) -> list[str]:
    """The first --ppl-seqlen (halving, then 128) for which ``fits(seqlen)``."""
    for t in (ppl_seqlen // 2, ppl_seqlen // 4, 128):
        if 2 <= t < ppl_seqlen and fits(t):
            return [f"--ppl-seqlen {t}"]
    return []


def _host_tips(plan_of, cfg, stages, avail, ppl_seqlen, batch) -> list[str]:
    """Options that bring the prediction under ``avail`` (the first value that works per knob)."""
    tips = []
    if "quantize" in stages and stages["quantize"] > avail:
        tips += _smaller_calibration(cfg, lambda trial: plan_of(trial, None, 1)["quantize"] <= avail, (2, 4, 8))
        if cfg.offload != "disk":
            tips.append("--offload disk")
    if "perplexity" in stages and stages["perplexity"] > avail and ppl_seqlen:
        if batch > 1:
            tips.append("--ppl-batch-size 1")
        tips += _shorter_windows(ppl_seqlen, lambda t: plan_of(cfg, t, 1)["perplexity"] <= avail)
    return tips


def eval_batch_that_fits(config, adapter: ModelAdapter, seqlen: int, device) -> int:
    """Perplexity windows per forward for rsq eval: the most, up to 4, whose working memory fits."""
    if str(device) != "cpu":
        return 4
    avail = available_bytes()
    batch = 4
    if avail is None:
        return batch
    model = param_counts(config, adapter)["total"] * 4
    while batch > 1 and _rss_bytes() + model + eval_bytes(config, adapter, seqlen, batch) > avail:
        batch //= 2
    return batch


# ----------------------------------------------------------------------------- device memory (GPU jobs)


def device_free_bytes(device) -> int:
    """Free memory of a CUDA device now (torch.cuda.mem_get_info), bytes."""
    return int(torch.cuda.mem_get_info(device)[0])


# The device-peak prediction ran 13 % low on the one GPU job measured (SmolLM2 gptq 4-bit on an H100:
# 0.789 GiB predicted, 0.908 GiB torch.cuda.max_memory_allocated; bench/NOTES-memory.md), so a job
# is admitted only if its prediction times this margin fits the free memory.
DEVICE_MARGIN = 1.25


def device_memory_plan(config, adapter: ModelAdapter, cfg, job: JobShape) -> dict:
    """Predicted peak device memory per stage, bytes. quantize: one layer, its Hessians and a batch
    in flight (rsq.plan.memory_plan), plus the calibration activations where --offload device keeps
    them there (auto puts them there only if they use under a quarter of the free memory, so they
    never decide whether a job fits). perplexity (``job.ppl_seqlen`` windows, ``job.ppl_batch_size``
    a forward): the whole model on the device plus one forward's working memory (eval_bytes); a
    streamed run evaluates layer by layer (as its quantize stage)."""
    nbytes = TORCH_DTYPES[cfg.dtype].itemsize
    work = Workload(
        nsamples=cfg.calib.nsamples * cfg.importance.expand,
        seqlen=cfg.calib.seqlen,
        bits=cfg.grid.bits,
        act_bytes=nbytes,
        weight_bytes=nbytes,
        batch=cfg.batch_size,
        group_size=cfg.grid.group_size,
    )
    mem = memory_plan(config, adapter, work)
    key = "device_peak_if_activations_on_device_GiB" if cfg.offload == "device" else "device_peak_estimate_GiB"
    stages = {}
    if cfg.quantizes:
        stages["quantize"] = int(mem[key] * GiB)
    if job.ppl_seqlen:
        work = eval_bytes(config, adapter, job.ppl_seqlen, job.ppl_batch_size)
        if job.streamed:
            stages["perplexity"] = int(mem["layer_on_device_GiB"] * GiB) + work
        else:
            stages["perplexity"] = param_counts(config, adapter)["total"] * nbytes + work
    return stages


def fit_device_memory(config, adapter: ModelAdapter, cfg, job: JobShape, *, device, enforce: bool = True) -> dict:
    """The predicted peak device memory of a job (``job.ppl_batch_size``: an int) against the
    chosen CUDA device's free memory; MemoryBudgetError naming options that fit where it does not
    (before anything is written). On the CPU: the prediction only (``applies`` false)."""

    def plan_of(c, seqlen=job.ppl_seqlen, batch=job.ppl_batch_size):
        return device_memory_plan(config, adapter, c, replace(job, ppl_seqlen=seqlen, ppl_batch_size=batch))

    stages = plan_of(cfg)
    peak = max(stages.values(), default=0)
    applies = getattr(device, "type", str(device)) == "cuda"
    free = device_free_bytes(device) if applies else None
    budget = None if free is None else int(free / DEVICE_MARGIN)
    record = {
        "predicted_peak_GiB": _gib(peak),
        "stages_GiB": {k: _gib(v) for k, v in stages.items()},
        "free_GiB": None if free is None else _gib(free),
        "applies": applies,
        "margin": DEVICE_MARGIN,
    }
    if not (enforce and applies and peak > budget):
        return record
    over = {k for k, v in stages.items() if v > budget}
    tips = _device_tips(plan_of, cfg, over, budget, job)
    fit = ", ".join(tips) if tips else "a GPU with more free memory"
    raise MemoryBudgetError(
        f"this job needs about {_gib(peak):.1f} GiB of memory on {device} (largest stage: "
        f"{max(over, key=stages.get)}), "
        f"but only {_gib(free):.1f} GiB is free there (the plan keeps {DEVICE_MARGIN:.2f}x headroom): "
        f"try {fit}, or --device cpu"
    )


def _device_tips(plan_of, cfg, over: set, budget: int, job: JobShape) -> list[str]:
    """Options that bring the stages in ``over`` under ``budget`` (the first value that works per knob)."""
    tips = []
    if "quantize" in over:

        def fits(trial) -> bool:
            return plan_of(trial).get("quantize", 0) <= budget

        if cfg.offload == "device" and fits(replace(cfg, offload="cpu")):
            tips.append("--offload cpu")
        for b in (cfg.batch_size // 2, cfg.batch_size // 4, 1):
            if 1 <= b < cfg.batch_size and fits(replace(cfg, batch_size=b)):
                tips.append(f"--batch-size {b}")
                break
        tips += _smaller_calibration(cfg, fits, (2, 4))
    if "perplexity" in over and job.ppl_seqlen:
        if job.ppl_batch_size > 1 and plan_of(cfg, batch=1)["perplexity"] <= budget:
            tips.append("--ppl-batch-size 1")
        tips += _shorter_windows(job.ppl_seqlen, lambda t: plan_of(cfg, seqlen=t, batch=1)["perplexity"] <= budget)
        if not job.streamed:
            tips.append("--ppl none (then rsq eval)")
    return tips
