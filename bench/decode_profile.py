"""Where the decode step's time goes: torch.profiler's kernels of rsq's compiled decode step,
classified by name, per step, per decoder layer and outside the layers (the head), against the
step's wall time (issue 29).

    python3 bench/decode_profile.py [--formats 4,3] [--batches 1,16] [--short 8] [--steps 32]
        [--graphs auto|on|off] [--json FILE] [--deadline S]

(the default run: one Llama-3-8B-shaped model, bf16 and rsq 4-bit + 3-bit RTN checkpoints built as
bench/generate_speed.py builds them, batch 1 and 16; about 6-8 minutes on one H100/H200, mostly the
first calls' compilation).

What is measured, per (model, batch):
1. Warm-up: ``rsq.generation.generate`` (rsq's loop with its CUDA defaults: static cache, fused
   q/k/v + gate/up, packed-GQA decode attention, the step compiled with mode="reduce-overhead", so
   CUDA graphs) is called once (the first call: compilation, CUDA-graph capture, humming's layer
   conversion and JIT; reported as ``first_call_s``, split into the eager prefill (where humming
   converts and JIT-compiles the layers it runs at M > 1) and the first decode step (dynamo +
   inductor + Triton JIT + capture), next to the same call's split once warm) and once more per
   length.
2. Wall time: calls of ``--short`` and ``--short + --steps`` new tokens (the same prompt, the same
   static cache length, so the same compiled step and graph), each timed with CUDA events around the
   call (on the CPU: perf_counter), median of ``--reps``; per step = (long - short) / steps. The
   difference removes the prefill, the first step and the call's fixed costs: what is left is
   ``--steps`` decode steps exactly as the loop runs them (graph replay + the loop's few small ops).
3. Kernels: the same two calls under torch.profiler (CUDA activity only on a GPU); per category the
   kernel time and count of the long call minus the short call's, divided by --steps. Kernels
   inside CUDA-graph replays are recorded by CUPTI one by one (they show in
   bench/figures/generate_profile_h100_b16.txt, a profile of graph replays); the script checks it
   (fewer kernels per step than decoder layers means the replays were not seen) and, with
   ``--graphs auto``, then profiles the same compiled step without CUDA graphs
   (``LoopOptions(cuda_graphs=False)``, plain inductor) and says so in the output.
4. Per layer / outside: the long call's kernels in time order are folded into --steps identical
   steps (the kernel names repeat with the per-step count found in 3), the step is split into
   ``before + layers x period + after`` (the longest period whose names, or failing that whose
   categories, repeat exactly once per decoder layer); the per-layer figures are the mean over the
   layers, "after" holds the head (final norm, lm_head, argmax) and the loop's copies, "before"
   the embedding, RoPE tables and the graph's input copies (their kernel names are listed).
5. Gaps: ``gap = wall - kernel sum`` per step; from the folded timeline also the idle time between
   consecutive kernels of a step and the largest such gaps with the kernels around them (where the
   GPU waits: for the host, or between launches inside the graph).

Categories (:func:`classify`, a pure function of the kernel name; on the CPU of the op name):
quantized GEMM (humming, rsq's Triton GEMV/GEMM), bf16 GEMM (cuBLAS/nvjet/cutlass: the lm_head and
any unquantized linear), attention (SDPA/flash/cuDNN/efficient kernels and the K/V copies fused
into their inputs), norms (rsqrt reductions), RoPE + KV-cache writes, other elementwise (SiLU x mul,
residual adds, casts, copies), Hadamard (online rotations: rsq's Triton Kronecker kernel; the
"block" and random kinds run as torch matmuls inside rsq::hadamard and show on a GPU as bf16 GEMM,
kernel names carry no caller), sampling/argmax, other.

On the CPU (``--device cpu``; tests/unit/test_decode_profile.py runs the same path on a tiny model)
the "kernels" are the profiler's operators, each with its self time, in the category of its
outermost classified ancestor; the eager forwards of rsq's quantized linears and online rotations
run inside profiler ranges named like their custom ops (rsq::quant_linear, rsq::hadamard), so an
aten::mm inside a quantized linear is quantized GEMM. The wall time comes from perf_counter. CPU
figures are a check of the code path, not speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_BENCH))
sys.path.insert(0, _BENCH)

CATEGORIES = (
    "quantized_gemm",
    "bf16_gemm",
    "attention",
    "norm",
    "rope_kv",
    "elementwise",
    "hadamard",
    "sampling",
    "other",
)
LABELS = {
    "quantized_gemm": "quantized GEMM",
    "bf16_gemm": "bf16 GEMM",
    "attention": "attention",
    "norm": "norms",
    "rope_kv": "RoPE + KV writes",
    "elementwise": "other elementwise",
    "hadamard": "Hadamard",
    "sampling": "sampling/argmax",
    "other": "other",
}
# categories an enclosing CPU operator passes to the operators it calls (not elementwise / other)
SPECIFIC = frozenset(CATEGORIES) - {"elementwise", "other"}
# the profiler's own activities, not kernels
PROFILER_EVENTS = frozenset(
    {"Activity Buffer Request", "Buffer Flush", "Overhead", "Iteration Start: PyTorch Profiler"}
)


def _token(name: str, *tokens: str) -> bool:
    """Whether one of ``tokens`` is an ``_``-separated word of ``name`` (inductor joins the fused
    operators' names with ``_``: triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_12)."""
    return re.search(r"(?:^|_)(?:" + "|".join(map(re.escape, tokens)) + r")(?:_|$)", name) is not None


_RSQ_QUANT = re.compile(r"^_(gemv|gemv_[a-z]+|small|dot|dequant)_kernel\b")  # rsq/kernels/triton_wq.py, triton_e8p.py
_RSQ_ATTN = re.compile(r"^_(lse|colsum)_kernel\b")  # rsq/kernels/triton_attention.py


_ATEN_GEMM = frozenset({"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "mv", "addmv", "dot", "_addmm_activation"})


def classify(name: str) -> str:
    """The category (one of :data:`CATEGORIES`) of a GPU kernel, or of a CPU operator, by its name
    alone. Names may be truncated (the profiler's tables cut them): what the prefix shows decides."""
    n = name.strip()
    if n.startswith("void "):
        n = n[5:].strip()
    low = n.lower()
    # an operator ("aten::mm", "rsq::hadamard"): its own name; a kernel: the whole name
    op = low.split("::", 1)[1] if re.fullmatch(r"[a-z_0-9]+::[a-z_0-9.]+", low) else None
    # online rotations: rsq's Kronecker Hadamard kernel and custom op, fast-hadamard-transform
    if n.startswith("_kron_kernel") or "hadamard" in low:
        return "hadamard"
    # quantized GEMMs: humming (vLLM's JIT GEMMs), rsq's Triton kernels and custom op, Marlin, gemlite
    if low.startswith("humming") or _RSQ_QUANT.match(n) or "marlin" in low or "gemlite" in low:
        return "quantized_gemm"
    if low.startswith(("rsq::quant_linear", "rsq::wq_linear")):
        return "quantized_gemm"
    # attention: SDPA's kernels (cuDNN, flash, memory-efficient), flash-attn, rsq's Triton attention,
    # and the copies inductor fuses into SDPA's inputs (K/V repeated per query head)
    if _RSQ_ATTN.match(n) or any(s in low for s in ("sdpa", "flash", "fmha", "attention", "attn")):
        return "attention"
    if any(s in low for s in ("argmax", "argmin", "topk", "multinomial", "exponential")) or _token(op or low, "sort"):
        return "sampling"
    # dense GEMMs: cuBLAS (nvjet on Hopper, cublasLt's split-K reduce, gemv), cutlass, inductor's
    # mm templates (triton_tem_fused_mm_0) and decomposed mm reductions, aten's matmul operators
    if low.startswith(("nvjet", "cublas", "cutlass")) or any(s in low for s in ("gemm", "gemv", "splitkreduce")):
        return "bf16_gemm"
    if op is not None and op in _ATEN_GEMM:
        return "bf16_gemm"
    if low.startswith(("triton_tem", "triton_red", "triton_per")) and _token(low, "mm", "addmm", "bmm"):
        if not _token(low, "rsqrt"):
            return "bf16_gemm"
    if _token(op or low, "rsqrt", "rms_norm", "layer_norm", "native_layer_norm"):
        return "norm"
    if _token(op or low, "cos", "sin", "index_copy", "index_put", "rotary") or "rotary" in low:
        return "rope_kv"
    if _token(op or low, "softmax", "_softmax"):
        return "attention"
    if op is not None or low.startswith(("triton_poi", "triton_per", "triton_red")):
        return "elementwise" if op not in ("empty", "empty_strided", "resize_") else "other"
    if any(s in low for s in ("elementwise_kernel", "catarraybatchedcopy", "memcpy", "memset", "fill", "copy")):
        return "elementwise"
    return "other"


@dataclass(frozen=True)
class Kernel:
    """One kernel of a profile (on the CPU: one operator): its name, its category, its start and
    its time in microseconds (a kernel's duration; an operator's self time, without its children's)."""

    name: str
    category: str
    start: float
    us: float

    @property
    def end(self) -> float:
        return self.start + self.us


def kernels_of(events, device: str) -> list[Kernel]:
    """The kernels of a profile's events (``prof.events()``) in time order: on CUDA its device
    events (kernels, memcpy/memset); on the CPU every operator with its self time, in the category
    of its outermost classified ancestor (:data:`SPECIFIC`: an aten::mm inside rsq::quant_linear is
    quantized GEMM), or else its own."""
    from torch.autograd import DeviceType

    out = []
    if torch.device(device).type == "cuda":
        for e in events:
            if e.device_type == DeviceType.CUDA and e.name not in PROFILER_EVENTS:
                name = e.trace_name or e.name
                out.append(Kernel(name, classify(name), e.time_range.start, e.time_range.elapsed_us()))
    else:
        for e in events:
            if e.device_type != DeviceType.CPU or e.name in PROFILER_EVENTS:
                continue
            category, node = classify(e.name), e.cpu_parent
            while node is not None:
                c = classify(node.name)
                if c in SPECIFIC:
                    category = c
                node = node.cpu_parent
            out.append(Kernel(e.name, category, e.time_range.start, e.self_cpu_time_total))
    out.sort(key=lambda k: k.start)
    return out


def totals(kernels) -> dict[str, dict[str, float]]:
    """Per category: kernel microseconds and count."""
    t = {c: {"us": 0.0, "count": 0} for c in CATEGORIES}
    for k in kernels:
        t[k.category]["us"] += k.us
        t[k.category]["count"] += 1
    return t


def per_step(short: list[Kernel], long: list[Kernel], steps: int) -> dict[str, dict[str, float]]:
    """Per category, (long call - short call) / ``steps``: kernel microseconds and count per step."""
    a, b = totals(short), totals(long)
    return {c: {k: (b[c][k] - a[c][k]) / steps for k in ("us", "count")} for c in CATEGORIES}


def _periodic_runs(keys: list, period: int) -> list[int]:
    """run[i] = how many consecutive positions from i on satisfy keys[j] == keys[j + period]."""
    n = len(keys) - period
    run = [0] * (max(n, 0) + 1)
    for i in range(n - 1, -1, -1):
        run[i] = run[i + 1] + 1 if keys[i] == keys[i + period] else 0
    return run


def fold(kernels: list[Kernel], period: int, steps: int) -> list[list[Kernel]] | None:
    """The last ``steps`` consecutive blocks of ``period`` kernels with the same names in the same
    order (the decode steps of a call: the latest such window, so that it ends with the call's last
    step), or None when there is none."""
    if period < 1 or steps < 1 or steps * period > len(kernels):
        return None
    names = [k.name for k in kernels]
    need = (steps - 1) * period  # positions i in the window that must equal i + period
    run = _periodic_runs(names, period)
    for o in range(len(kernels) - steps * period, -1, -1):
        if need == 0 or run[o] >= need:
            return [kernels[o + i * period : o + (i + 1) * period] for i in range(steps)]
    return None


def layer_split(keys: list, layers: int, max_outside: int | None = None) -> tuple[int, int] | None:
    """(before, period) such that ``keys[before : before + layers * period]`` is ``layers`` repeats
    of one block: the longest period (fewest keys outside the layers) that fits, or None.
    ``max_outside``: at most this many keys outside the repeats (default half of them)."""
    n = len(keys)
    if layers < 1 or n < layers:
        return None
    if max_outside is None:
        max_outside = n // 2
    for period in range(n // layers, 0, -1):
        outside = n - layers * period
        if outside > max_outside:
            break
        if layers == 1:
            return 0, period
        need = (layers - 1) * period
        run = _periodic_runs(keys, period)
        for before in range(outside + 1):
            if run[before] >= need:
                return before, period
    return None


def step_breakdown(steps: list[list[Kernel]], layers: int) -> dict:
    """Per layer and outside the layers, from folded steps (same names position by position): mean
    microseconds per position over the steps, the split of :func:`layer_split` on the names (or on
    the categories when the first or last layer's kernels are fused differently), and the idle time
    between consecutive kernels of a step."""
    width = len(steps[0])
    mean = [statistics.fmean(s[j].us for s in steps) for j in range(width)]
    names = [k.name for k in steps[0]]
    cats = [k.category for k in steps[0]]
    split, on = layer_split(names, layers), "names"
    if split is None:
        split, on = layer_split(cats, layers), "categories"
    out: dict = {"kernels_per_step": width}
    # idle between consecutive kernels of one step, averaged over the steps, by position
    gaps = [statistics.fmean(max(0.0, s[j + 1].start - s[j].end) for s in steps) for j in range(width - 1)]
    span = statistics.fmean(s[-1].end - s[0].start for s in steps)
    between = [steps[i + 1][0].start - steps[i][-1].end for i in range(len(steps) - 1)]
    out["timeline"] = {
        "span_us": span,  # first kernel's start to last kernel's end, mean per step
        "busy_us": sum(mean),
        "idle_in_step_us": sum(gaps),
        "idle_between_steps_us": statistics.fmean(between) if between else None,
        "largest_gaps": [
            {"us": gaps[j], "after": names[j], "before": names[j + 1], "position": j}
            for j in sorted(range(len(gaps)), key=lambda j: -gaps[j])[:6]
        ],
    }
    if split is None:
        out["layers"] = None
        return out
    before, period = split
    stop = before + layers * period

    def cat_sum(positions, div=1):
        t = {c: {"us": 0.0, "count": 0.0} for c in CATEGORIES}
        for j in positions:
            t[cats[j]]["us"] += mean[j] / div
            t[cats[j]]["count"] += 1 / div
        return {c: v for c, v in t.items() if v["count"]}

    out["layers"] = {
        "split_on": on,
        "kernels_per_layer": period,
        "per_layer": cat_sum(range(before, stop), layers),
        "per_layer_idle_us": sum(gaps[before : stop - 1]) / layers,
        "before": cat_sum(range(before)),
        "after": cat_sum(range(stop, width)),
        "before_kernels": [(names[j], round(mean[j], 2)) for j in range(before)],
        "after_kernels": [(names[j], round(mean[j], 2)) for j in range(stop, width)],
        # one layer's kernels in order (the middle layer), to read what a layer launches
        "layer_kernels": [
            (names[j], round(mean[j], 2))
            for j in range(before + (layers // 2) * period, before + (layers // 2 + 1) * period)
        ],
    }
    return out


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timed_call(fn, device: str) -> float:
    """Seconds of ``fn()``: CUDA events around it on a GPU (after the queue drained), else perf_counter."""
    if torch.device(device).type == "cuda":
        _sync(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class _CpuLabels:
    """On the CPU (eager): each quantized linear's and online rotation's forward inside a profiler
    range named like its custom op (``rsq::quant_linear``, ``rsq::hadamard``: what a compiled
    graph calls), so that their operators are classified by what they compute. Forward hooks,
    removed on exit."""

    def __init__(self, model):
        from rsq.rotation.online import OnlineRotationModule

        self.handles, self.open = [], []
        for m in model.modules():
            label = None
            if isinstance(m, OnlineRotationModule):
                label = "rsq::hadamard"
            elif hasattr(m, "format_name") and hasattr(m, "kernel_inputs"):
                label = "rsq::quant_linear"
            if label:
                self.handles.append(m.register_forward_pre_hook(lambda mod, args, label=label: self._enter(label)))
                self.handles.append(m.register_forward_hook(lambda mod, args, out: self._exit()))

    def _enter(self, label):
        rf = torch.autograd.profiler.record_function(label)
        rf.__enter__()
        self.open.append(rf)

    def _exit(self):
        self.open.pop().__exit__(None, None, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        while self.open:
            self._exit()


def _profile(fn, device: str, model=None) -> list[Kernel]:
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    _sync(device)
    if cuda or model is None:
        with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
            fn()
            _sync(device)
    else:
        with _CpuLabels(model), profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
    return kernels_of(prof.events(), device)


def check_lengths(prompt: int, short: int, steps: int) -> str | None:
    """What is wrong with these lengths for :func:`profile_step`, or None."""
    from rsq.generation import cache_length

    if prompt < 1 or short < 2 or steps < 1:
        return "--prompt >= 1, --short >= 2 (the short call must run the compiled step) and --steps >= 1"
    if cache_length(prompt + short) != cache_length(prompt + short + steps):
        return (
            f"--prompt {prompt} + --short {short} and + {short + steps} new tokens give different static cache "
            "lengths: lower --steps or --prompt so that both calls share one cache and one compiled step"
        )
    return None


def _humming_layers() -> int:
    """Quantized layers converted for humming so far in this process (0 without humming)."""
    try:
        from rsq.kernels import humming_backend
    except ImportError:
        return 0
    return len(humming_backend._LAYERS)


def profile_step(
    model,
    batch: int,
    *,
    prompt: int = 32,
    short: int = 8,
    steps: int = 32,
    reps: int = 5,
    device: str = "cuda",
    graphs: str = "auto",
    layers: int | None = None,
    seed: int = 0,
) -> dict:
    """The breakdown of one model's decode step at ``batch`` (the module docstring, steps 1-5)."""
    from rsq.generation import LoopOptions, decoder, generate

    problem = check_lengths(prompt, short, steps)
    if problem:
        raise ValueError(problem)
    long = short + steps
    layers = layers or model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, min(20000, model.config.vocab_size), (batch, prompt), generator=gen).to(device)
    cuda = torch.device(device).type == "cuda"

    def run(options):
        def call(n, opts=options):
            with torch.no_grad():
                return generate(model, ids, n, eos_token_id=(), options=opts)

        def split() -> dict:  # the loop's own timings of the call just made (timed=True)
            st = decoder(model).stats
            return {"prefill_s": st["prefill_s"], "first_step_s": st["first_step_s"], "decode_s": st["decode_s"]}

        built = _humming_layers()
        t0 = time.perf_counter()
        out = call(long, replace(options, timed=True))
        _sync(device)
        first = {"total_s": time.perf_counter() - t0, **split()}
        first["humming_layers_built"] = _humming_layers() - built
        assert out.shape == (batch, prompt + long), out.shape
        call(short)  # warm: both lengths (same cache, same compiled step)
        call(long, replace(options, timed=True))
        first["warm"] = split()  # the same call once compiled: what the first call's extra went to
        walls = {
            n: statistics.median(_timed_call(lambda n=n: call(n), device) for _ in range(reps)) for n in (short, long)
        }
        prof = {n: _profile(lambda n=n: call(n), device, model) for n in (short, long)}
        return first, walls, prof

    graph_mode = graphs != "off" and cuda
    first, walls, prof = run(LoopOptions(cuda_graphs=graph_mode))
    cats = per_step(prof[short], prof[long], steps)
    count = sum(v["count"] for v in cats.values())
    note = None
    if graph_mode and count < layers:
        note = (
            f"{count:.1f} kernels per step recorded with CUDA graphs on (fewer than the {layers} decoder "
            "layers): the profiler did not see the kernels inside the graph replays"
        )
        if graphs == "auto":
            note += "; profiled again with the same compiled step without CUDA graphs (cuda_graphs=False)"
            graph_mode = False
            first_graph_wall, first_graph_call = walls, first
            first, walls, prof = run(LoopOptions(cuda_graphs=False))
            cats = per_step(prof[short], prof[long], steps)
            count = sum(v["count"] for v in cats.values())
        print(f"[profile] {note}", flush=True)
    wall_us = (walls[long] - walls[short]) / steps * 1e6
    kernel_us = sum(v["us"] for v in cats.values())
    r = {
        "batch": batch,
        "layers": layers,
        "steps": steps,
        "cuda_graphs": graph_mode,
        "first_call_s": first["total_s"],
        "first_call": first,
        "wall_us": wall_us,
        "kernel_us": kernel_us,
        "gap_us": wall_us - kernel_us,
        "kernels": count,
        "kernel_count_integral": abs(count - round(count)) < 1e-9,
        "categories": cats,
        "stats": dict(decoder(model).stats or {}),
    }
    if note:
        r["note"] = note
        if graphs == "auto" and not graph_mode:
            r["wall_us_with_graphs"] = (first_graph_wall[long] - first_graph_wall[short]) / steps * 1e6
            r["first_call_with_graphs"] = first_graph_call
    # fold checks the names repeat with this period; a count that is not whole (a kernel that does
    # not run every step) usually leaves no such window, and then there is no per-layer split
    folded = fold(prof[long], round(count), steps) if count >= 1 else None
    r["breakdown"] = step_breakdown(folded, layers) if folded else None
    return r


def table(label: str, r: dict) -> str:
    """The printed table of one :func:`profile_step` result."""
    lay = (r.get("breakdown") or {}).get("layers")
    head = f"\n{label}, batch {r['batch']}: {r['steps']} decode steps"
    head += f" ({'CUDA graphs' if r['cuda_graphs'] else 'no CUDA graphs'})"
    f = r["first_call"]
    lines = [
        head,
        f"first call {f['total_s']:.1f} s: prefill {f['prefill_s']:.2f} s (warm {f['warm']['prefill_s']:.2f}), "
        f"first step {f['first_step_s']:.2f} s (warm {f['warm']['first_step_s'] * 1e3:.1f} ms), "
        f"humming layers built {f['humming_layers_built']}",
    ]
    cols = "| category | us/step | kernels/step |"
    if lay:
        cols += f" us/layer (x{r['layers']}) | kernels/layer | us outside: before | after (head) |"
    lines += [cols, "|---|" + "---|" * (cols.count("|") - 2)]
    for c in CATEGORIES:
        v = r["categories"][c]
        if not v["count"] and not v["us"]:
            continue
        row = f"| {LABELS[c]} | {v['us']:.1f} | {v['count']:.2f} |"
        if lay:
            pl = lay["per_layer"].get(c, {"us": 0.0, "count": 0.0})
            b = lay["before"].get(c, {"us": 0.0})["us"]
            a = lay["after"].get(c, {"us": 0.0})["us"]
            row += f" {pl['us']:.2f} | {pl['count']:.2f} | {b:.1f} | {a:.1f} |"
        lines.append(row)
    lines.append(f"| **kernel sum** | {r['kernel_us']:.1f} | {r['kernels']:.2f} |" + (" | | | |" if lay else ""))
    lines.append(f"| **wall (events)** | {r['wall_us']:.1f} | |" + (" | | | |" if lay else ""))
    lines.append(f"| **gap = wall - kernels** | {r['gap_us']:.1f} | |" + (" | | | |" if lay else ""))
    bd = r.get("breakdown")
    if bd:
        t = bd["timeline"]
        between = t["idle_between_steps_us"]
        lines.append(
            f"timeline per step: span {t['span_us']:.1f} us, busy {t['busy_us']:.1f}, idle between kernels "
            f"{t['idle_in_step_us']:.1f}" + (f", between steps {between:.1f}" if between is not None else "")
        )
        if lay:
            lines.append(
                f"layers: {lay['kernels_per_layer']} kernels per layer (split on {lay['split_on']}), idle "
                f"{lay['per_layer_idle_us']:.2f} us per layer; before: {len(lay['before_kernels'])} kernels, "
                f"after: {len(lay['after_kernels'])}"
            )
            lines.append("  one layer (us): " + "; ".join(f"{n[:60]} {u}" for n, u in lay["layer_kernels"]))
            lines.append("  after the layers: " + "; ".join(f"{n[:60]} {u}" for n, u in lay["after_kernels"]))
        lines.append(
            "largest gaps: "
            + "; ".join(
                f"{g['us']:.1f} us after {g['after'][:40]} -> {g['before'][:40]}" for g in t["largest_gaps"][:4]
            )
        )
    else:
        lines.append("(the long call's kernels did not fold into identical steps: no per-layer split)")
    if r.get("note"):
        lines.append("NOTE: " + r["note"])
    return "\n".join(lines)


def summary(cells: list[dict]) -> str:
    """One row per (model, batch): microseconds per step by category, the kernel sum, the wall
    time, the gap, and the kernels per step / per layer."""
    short = {
        "quantized_gemm": "qGEMM",
        "bf16_gemm": "bf16 GEMM",
        "attention": "attn",
        "norm": "norms",
        "rope_kv": "RoPE+KV",
        "elementwise": "elemwise",
        "hadamard": "Hadamard",
        "sampling": "argmax",
        "other": "other",
    }
    head = "| model | batch | " + " | ".join(short[c] for c in CATEGORIES) + " | kernels | wall | gap | "
    head += "kernels/step | kernels/layer |"
    title = "us per decode step (kernel time by category; wall: CUDA events, CPU: perf_counter; gap = wall - kernels)"
    lines = ["\n" + title, head]
    lines.append("|---|---|" + "---|" * (len(CATEGORIES) + 5))
    for r in cells:
        lay = (r.get("breakdown") or {}).get("layers")
        cells_ = " | ".join(f"{r['categories'][c]['us']:.0f}" for c in CATEGORIES)
        lines.append(
            f"| {r['model']} | {r['batch']} | {cells_} | {r['kernel_us']:.0f} | {r['wall_us']:.0f} | "
            f"{r['gap_us']:.0f} | {r['kernels']:.1f} | {lay['kernels_per_layer'] if lay else '-'} |"
        )
    return "\n".join(lines)


def main() -> int:
    from generate_speed import add_model_args, build_models, raise_recompile_limits

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, formats="4,3", batches="1,16")
    ap.add_argument("--short", type=int, default=8, help="new tokens of the short call")
    ap.add_argument("--steps", type=int, default=32, help="decode steps measured (long call = short + steps)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per length (median)")
    ap.add_argument(
        "--graphs",
        default="auto",
        choices=("auto", "on", "off"),
        help="CUDA graphs: on, off, or auto (on; off if the profiler cannot see kernels inside the graphs)",
    )
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--deadline", type=float, default=1e9, help="start no measurement after this many seconds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    raise_recompile_limits()
    start = time.perf_counter()
    device = args.device
    cuda = torch.device(device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here; pass --device cpu (a CPU check, not figures)")
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    formats = [f for f in args.formats.split(",") if f]
    try:
        batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        ap.error(f"--batches: a comma list of positive integers, got {args.batches!r}")
    if not batches or min(batches) < 1:
        ap.error(f"--batches: a comma list of positive integers, got {args.batches!r}")
    problem = check_lengths(args.prompt, args.short, args.steps)
    if problem:
        ap.error(problem)
    unknown = [f for f in formats if f not in ("2", "3", "4", "8", "e8p")]
    if unknown:
        ap.error(f"--formats: 2, 3, 4, 8 (uniform) or e8p, got {', '.join(unknown)}")
    record = {"gpu": gpu, "torch": torch.__version__, "args": vars(args), "build": {}, "cells": []}

    def save():
        if args.json:
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps(record, indent=2))
            tmp.replace(args.json)

    models = build_models(args, formats, device, record["build"], save)
    for batch in batches:
        for name, model in models.items():
            if time.perf_counter() - start > args.deadline:
                print(f"[deadline] {name} batch {batch} and later not measured", flush=True)
                break
            r = profile_step(
                model,
                batch,
                prompt=args.prompt,
                short=args.short,
                steps=args.steps,
                reps=args.reps,
                device=device,
                graphs=args.graphs,
            )
            r["model"] = name
            record["cells"].append(r)
            print(table(f"{gpu}: {name}", r), flush=True)
            save()
    print(summary(record["cells"]))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
