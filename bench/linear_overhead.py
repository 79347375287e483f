"""Host and device time of one quantized linear call, per path and token count (issue 29: why the
batch-1 prefill of a quantized model is slower than its batch-16 prefill and than bf16's).

    python3 bench/linear_overhead.py [--bits 3,4] [--m 1,8,32,128,512] [--calls 50] [--prefill 4]
        [--json FILE]

For each Llama-3-8B linear as rsq's decode loop runs it (q/k/v and gate/up fused: 6144x4096,
4096x4096, 28672x4096, 4096x14336), each bit width and each token count M, and for each path:

* ``module``: ``QuantLinear(x)`` (rsq.nn: dispatch -> select_backend -> the backend), what the eager
  prefill calls;
* ``backend``: the chosen backend's function called directly (no module, no selection);
* ``humming``: ``HummingLayer(x)`` on the layer rsq converts (no rsq code at all; at M = 1 too,
  where rsq's dispatch picks its own GEMV);
* ``bf16``: ``F.linear`` with a bf16 weight of the same shape (the baseline).

two figures, microseconds per call:

* ``host``: the CPU time to enqueue one call, measured while the GPU is held busy by
  ``torch.cuda._sleep`` (so the host never waits for it): perf_counter over --calls calls;
* ``device``: CUDA events around the same --calls calls enqueued behind another sleep (so they run
  back to back on the GPU, with no host gap between them).

A path is host-bound at M where host > device: the eager prefill then pays ``host`` per linear.

Then the same two figures for export's online down_proj rotation (14336 wide, blocks of 2048) at
M = 1, 16, 64, 2048 and 32768 tokens: rsq.kernels.hadamard's dispatch against the torch block
transform.

--prefill L (0: skip): also builds an L-layer Llama-3-8B-shaped model and its 3-bit RTN checkpoint
(bench/generate_speed.py's builders), and times rsq.generation's prefill (timed stats) of a 32-token
prompt at batch 1 and 16 for bf16 and 3-bit, eager and with ``LoopOptions(compile_prefill=True)``,
median of 5 (the first call, which compiles, reported apart), plus one torch.profiler table of the
batch-1 3-bit eager prefill sorted by self CPU time (the Python and dispatcher cost per op).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_BENCH))
sys.path.insert(0, _BENCH)

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
SLEEP_CYCLES = 400_000_000  # ~0.2 s at ~2 GHz: longer than any --calls burst's host time


def random_layer(out_f: int, in_f: int, bits: int, device):
    from rsq.formats.uniform import QuantLinear

    g = torch.Generator(device="cpu").manual_seed(out_f + in_f + bits)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g)
    scale = torch.rand(out_f, 1, generator=g) * 0.01 + 0.001
    zero = torch.full((out_f, 1), float(1 << (bits - 1)))
    return QuantLinear.from_codes(codes.to(device), scale.to(device), zero.to(device), bits, -1)


def _host_and_device(fn, calls: int, cuda: bool) -> tuple[float, float]:
    """(host us, device us) per call of fn(): see the module docstring."""
    for _ in range(3):
        fn()
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t = (time.perf_counter() - t0) / calls * 1e6
        return t, t
    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(SLEEP_CYCLES)
    e0.record()
    for _ in range(calls):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return host, e0.elapsed_time(e1) / calls * 1e3


def measure_linears(bits_list, ms, calls: int, device) -> list[dict]:
    from rsq.kernels import humming_backend, select_backend

    cuda = torch.device(device).type == "cuda"
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) * 0.02
        for bits in bits_list:
            mod = random_layer(out_f, in_f, bits, device)
            for m in ms:
                x = torch.randn(m, in_f, device=device, dtype=torch.bfloat16)
                chosen = select_backend(x, mod)
                fn = chosen.load()
                tensors, bias = mod.kernel_inputs(x)
                kw = {k: getattr(mod, k) for k in chosen.keywords}
                paths = {
                    "module": lambda: mod(x),
                    "backend": lambda: fn(x, *tensors, bias, **kw),
                    "bf16": lambda: F.linear(x, w),
                }
                if cuda and chosen.name != "reference":  # humming beside rsq's own kernel at M = 1 too
                    layer = humming_backend.layer_for(
                        mod.qweight, mod.scales, mod.qzeros, None, bits=bits, in_features=in_f, group_size=-1
                    )
                    if layer is not None:
                        paths["humming"] = lambda: layer(x)
                for path, call in paths.items():
                    with torch.no_grad():
                        host, dev = _host_and_device(call, calls, cuda)
                    row = dict(shape=name, out=out_f, inp=in_f, bits=bits, m=m, path=path, backend=chosen.name)
                    row.update(host_us=host, device_us=dev)
                    rows.append(row)
                    print(
                        f"{name:8s} {bits}-bit M={m:4d} {path:8s} ({chosen.name:14s}) host {host:8.1f} us  "
                        f"device {dev:8.1f} us{'  HOST-BOUND' if host > dev else ''}",
                        flush=True,
                    )
    return rows


def measure_hadamard(ms, calls: int, device, width: int = 14336, block: int = 2048) -> list[dict]:
    """export's online down_proj rotation (the ``block`` kind) per call: rsq.kernels.hadamard's
    dispatch (the Triton kernel per block on CUDA) against the torch transform it used before
    (a float32 butterfly pass per factor of two), same host/device method."""
    from rsq.kernels.hadamard import hadamard_rotate
    from rsq.rotation.hadamard import block_hadamard_transform

    cuda = torch.device(device).type == "cuda"
    rows = []
    for m in ms:
        x = torch.randn(m, width, device=device, dtype=torch.bfloat16)
        paths = {
            "dispatch": lambda: hadamard_rotate(x, "block", width, block),
            "torch": lambda: block_hadamard_transform(x, block),
        }
        for path, call in paths.items():
            with torch.no_grad():
                host, dev = _host_and_device(call, calls, cuda)
            rows.append(dict(width=width, block=block, m=m, path=path, host_us=host, device_us=dev))
            print(f"hadamard {width}/{block} M={m:5d} {path:8s} host {host:8.1f} us  device {dev:8.1f} us", flush=True)
    return rows


def measure_prefill(layers: int, device, prompt: int = 32, reps: int = 5) -> dict:
    from generate_speed import build_model, write_checkpoint

    import rsq
    from rsq.generation import LoopOptions, decoder, generate

    base = build_model("llama-3-8b", layers, device)
    out = Path("/tmp/rsq-linear-overhead/3")
    write_checkpoint(base, "3", -1, out)
    q, _ = rsq.load(out, device=device, dtype=torch.bfloat16)
    res = {}
    for compiled in (False, True):
        opts = LoopOptions(timed=True, compile_prefill=compiled)
        how = "compiled" if compiled else "eager"
        for label, model in (("bf16", base), ("3-bit", q)):
            for batch in (1, 16):
                ids = torch.randint(100, 20000, (batch, prompt), device=device)
                times = []
                for i in range(reps + 2):
                    with torch.no_grad():
                        generate(model, ids, 2, eos_token_id=(), options=opts)
                    t = decoder(model).stats["prefill_s"] * 1e3
                    if i == 0:
                        res[f"{label} b{batch} {how} first"] = t
                    if i >= 2:
                        times.append(t)
                key = f"{label} b{batch} {how}"
                res[key] = statistics.median(times)
                print(
                    f"[prefill {how}] {label:6s} batch {batch:2d}, {layers} layers: {res[key]:.2f} ms "
                    f"(first call {res[key + ' first']:.0f} ms)",
                    flush=True,
                )
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(100, 20000, (1, prompt), device=device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(device).type == "cuda" else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        generate(q, ids, 1, eos_token_id=(), options=LoopOptions(timed=True))
    res["table"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60)
    print(res["table"], flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--m", default="1,8,32,128,512")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--prefill", type=int, default=4, help="layers of the prefill model (0: skip)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name(0) if torch.device(args.device).type == "cuda" else "cpu"
    print(f"device: {gpu}; torch {torch.__version__}", flush=True)
    record = {"gpu": gpu, "args": vars(args)}
    record["linears"] = measure_linears(
        [int(b) for b in args.bits.split(",")], [int(m) for m in args.m.split(",")], args.calls, args.device
    )
    record["hadamard"] = measure_hadamard([1, 16, 64, 2048, 32768], args.calls, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    if args.prefill:
        record["prefill"] = measure_prefill(args.prefill, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
