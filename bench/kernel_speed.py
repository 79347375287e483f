"""Weight-only quantized matmul kernels vs bf16 torch.matmul on Llama-3-8B linear shapes.

Run from the repository root on a CUDA machine:
    python3 bench/kernel_speed.py [--quick] [--m 1] [--sweep] [--no-e2e]

For each (out x in) shape, tokens M in {1, 4, 16, 64, 2048}, bits in {4, 3, 2} and group size in
{per channel, 128}, every matching kernel is first checked against rsq/kernels/reference.py
(relative error <= 1e-2) and then timed. Timing: a CUDA graph of calls cycling over enough copies of
the weights (>= 256 MB) that L2 (50 MB on H100) holds none of them, replayed several times; the median
replay / calls is reported (graphs remove Python launch overhead, which decode uses graphs to hide).
The same is done for bf16 torch.matmul(x, W^T). Bandwidth counts packed weights + scales + zeros +
activations in and out, and is compared with a device-to-device copy (read + write bytes) measured
in the same run. Unless --no-e2e, a proxy for decode tokens/s follows: 32 layers x 7 Llama-3-8B
linears at M = 1 (random weights, no attention/norms/sampling), bf16 vs 4-bit vs 3-bit, one CUDA
graph per token. --sweep first times alternative launch configurations of gemv (M = 1) and
matmul_small (M = 16). --only libs times the field's libraries beside rsq's dispatch choice on the
14336-wide shapes (M 1/16/64/2048, 4/3 bits, per channel and groups of 128): gemlite (fed rsq's codes)
and humming-kernels (vLLM's JIT GEMMs), with their load-time repack cost and bytes held; each is
skipped with a message when its package is missing. Results and their reading: bench/NOTES-kernels.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rsq.kernels import reference  # noqa: E402

SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]  # (out, in): qkv/o, k/v, gate/up, down
E2E_LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]
COPY_BYTES = 256 << 20  # weight bytes cycled per timed pass (> 5x L2)


def kernel_fns():
    from rsq.kernels import triton_wq as T

    return {"gemv": T.gemv, "small": T.matmul_small, "large": T.matmul_large, "dequant_mm": T.dequant_matmul}


def kernels_for(m: int) -> list[str]:
    if m <= 4:
        return ["gemv", "small"]
    if m <= 64:
        return ["small"]
    return ["dequant_mm", "large"]


# ------------------------------------------------------------------------------------------- timing


def graph_time_us(calls, replays: int = 7) -> float:
    """Median time per call (microseconds) of a CUDA graph running every callable in ``calls``."""
    for c in calls[:2]:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:  # warm-up on the capture stream (allocator pools)
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 10, 2 GiB buffers)."""
    a = torch.empty(1 << 31, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * a.numel() / statistics.median(times)


def matmul_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = graph_time_us([lambda: a @ b] * 4, replays=5)
    return 2 * 8192**3 / (t * 1e-6) / 1e12


# ------------------------------------------------------------------------------------------- data


def packed_weight(n, k, bits, group_size, dtype=torch.bfloat16):
    """Random packed weights (random int32 words = random codes), scales ~1e-2, random zeros."""
    groups = 1 if group_size == -1 else k // group_size
    kw = -(-k // 32) * bits
    qw = torch.randint(-(2**31), 2**31 - 1, (n, kw), device="cuda", dtype=torch.int32)
    s = (torch.rand(n, groups, device="cuda") * 0.02 + 1e-3).to(dtype)
    z = torch.randint(0, 1 << bits, (n, groups), device="cuda", dtype=torch.uint8)
    return qw, s, z


def weight_bytes(n, k, bits, group_size) -> int:
    groups = 1 if group_size == -1 else k // group_size
    return n * (-(-k // 32) * bits * 4 + groups * 3)


def n_copies(nbytes: int) -> int:
    return max(2, min(64, math.ceil(COPY_BYTES / nbytes)))


# ------------------------------------------------------------------------------------------- cases


def cases(quick: bool, only_m: int | None = None):
    """(out, in, M, bits, group, kernel): every bit width and both group sizes on the path each M
    takes, plus the other candidate kernel for 4-bit per channel (and 3-bit at prefill)."""
    bit_list = (4, 3) if quick else (4, 3, 2)
    groups = (-1,) if quick else (-1, 128)
    for n, k in SHAPES:
        for m, main, other in (
            (1, "gemv", "small"),
            (4, "gemv", "small"),
            (16, "small", "dequant_mm"),
            (64, "small", "dequant_mm"),
            (2048, "dequant_mm", "large"),
        ):
            if only_m is not None and m != only_m:
                continue
            for bits in bit_list:
                for g in groups:
                    yield n, k, m, bits, g, main
                    if m in (16, 64) and g == -1:  # dequantize + cuBLAS beside the tensor-core kernel
                        yield n, k, m, bits, g, other
                    elif other and (bits, g) in (((4, -1),) if m == 2048 else ((4, -1), (4, 128))):
                        yield n, k, m, bits, g, other


def _warm(case):
    """Compile one case's kernel in a worker process (fills Triton's on-disk cache)."""
    n, k, m, bits, g, name = case
    try:
        n_small = 64 if n % 16 == 0 else 63  # same divisibility by 16 as the real N
        qw, s, z = packed_weight(n_small, k, bits, g)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        kernel_fns()[name](x, qw, s, z, None, bits=bits, in_features=k, group_size=g, **_config(name, n, k, m, bits, g))
        torch.cuda.synchronize()
        return None
    except Exception as exc:  # reported, and the case is retried (and fails visibly) in the main process
        return f"warm-up {case}: {type(exc).__name__}: {exc}"


def _config(name, n, k, m, bits, g) -> dict:
    """The configuration the real shape would use, so that warm-up compiles the same kernel."""
    from rsq.kernels import triton_wq as T

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if name == "gemv":
        return {"config": T.gemv_config(m, n, k, bits, g, sms)}
    if name == "small":
        return {"config": T.small_config(m, n, k, bits, g, sms)}
    if name == "large":
        return {"config": T.large_config(m, n, k, bits, g, sms)}
    return {}


def run_case(case, results, copy_bw, bf16_cache):
    n, k, m, bits, g, name = case
    fn = kernel_fns()[name]
    kwargs = dict(bits=bits, in_features=k, group_size=g, **_config(name, n, k, m, bits, g))
    wb = weight_bytes(n, k, bits, g)
    copies = [packed_weight(n, k, bits, g) for _ in range(n_copies(wb))]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    qw, s, z = copies[0]
    y = fn(x, qw, s, z, None, **kwargs)
    ref = reference.wq_matmul(x.float(), qw, s, z, None, bits=bits, in_features=k, group_size=g)
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    del ref
    ok = bool(torch.isfinite(y).all()) and rel <= 1e-2
    t = graph_time_us([lambda c=c: fn(x, *c, None, **kwargs) for c in copies]) if ok else float("nan")
    del copies
    key = (n, k, m)
    if key not in bf16_cache:
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
        bf16_cache[key] = graph_time_us([lambda w=w: torch.matmul(x, w.t()) for w in ws])
        del ws
    t16 = bf16_cache[key]
    nbytes = wb + 2 * m * (k + n)
    results.append(
        dict(
            n=n,
            k=k,
            m=m,
            bits=bits,
            g=g,
            kernel=name,
            us=t,
            bf16_us=t16,
            speedup=t16 / t,
            gbs=nbytes / (t * 1e-6) / 1e9,
            pct=nbytes / (t * 1e-6) / copy_bw * 100,
            rel=rel,
            ok=ok,
            tflops=2 * m * n * k / (t * 1e-6) / 1e12,
            bf16_tflops=2 * m * n * k / (t16 * 1e-6) / 1e12,
        )
    )
    r = results[-1]
    print(
        f"{n:>5}x{k:<5} M={m:<4} {bits}b g={g:<4} {name:<10} {t:9.2f} us  bf16 {t16:9.2f} us  "
        f"x{r['speedup']:5.2f}  {r['gbs']:7.0f} GB/s ({r['pct']:5.1f}%)  rel {rel:.1e}{'' if ok else '  FAIL'}",
        flush=True,
    )


# ------------------------------------------------------------------------------------------- sweep

GEMV_SWEEP = [  # session 20 (H100): (8, 1024, 4) won at K = 4096 with >= 4096 rows, (8, 2048, 4) elsewhere
    dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw)
    for bn, bk, nw in (
        (8, 2048, 4),
        (8, 1024, 4),
        (16, 1024, 2),
    )
]
# the decode step's fused linears (q/k/v, gate/up) beside the single ones
GEMV_SHAPES = SHAPES + [(6144, 4096), (28672, 4096)]
SMALL_SWEEP = [
    dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns, split=sp)
    for bn, bk, nw, ns, sp in (
        (64, 256, 4, 3, 1.0),
        (64, 256, 4, 3, 2.0),
        (64, 256, 4, 3, 0.5),
        (64, 128, 4, 4, 1.0),
        (128, 128, 8, 3, 1.0),
        (64, 256, 4, 4, 4.0),
        (64, 512, 4, 3, 2.0),
        (128, 256, 8, 3, 2.0),
        (64, 128, 4, 5, 4.0),
        (32, 256, 4, 3, 2.0),
    )
]


def sweep_cases(small_only: bool = False, gemv_only: bool = False):
    for n, k in () if small_only else GEMV_SHAPES:
        for bits in (3, 4):
            for cfg in GEMV_SWEEP:
                yield ("gemv", n, k, 1, bits, -1, cfg)
    for n, k in () if gemv_only else SHAPES:
        if small_only and k == n:
            continue  # the quick small sweep: the two 14336-wide shapes
        for bits in (4, 3):
            for m in (16,) if small_only else (16, 64):
                for cfg in SMALL_SWEEP:
                    yield ("small", n, k, m, bits, -1, cfg)


def _sweep_config(name, n, k, m, bits, g, cfg):
    from rsq.kernels import triton_wq as T

    if name == "gemv":
        return dict(cfg, BLOCK_M=triton_next_pow2(m))
    base = T.small_config(m, n, k, bits, g, torch.cuda.get_device_properties(0).multi_processor_count)
    split = max(1, round(base["SPLIT_K"] * cfg["split"]))
    out = dict(
        base,
        BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        SPLIT_K=split,
    )
    if cfg["BLOCK_N"] != base["BLOCK_N"]:
        out["SPLIT_K"] = max(1, round(split * base["BLOCK_N"] / cfg["BLOCK_N"]))
    return out


def triton_next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _warm_sweep(case):
    name, n, k, m, bits, g, cfg = case
    try:
        qw, s, z = packed_weight(64, k, bits, g)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        kernel_fns()[name](
            x, qw, s, z, None, bits=bits, in_features=k, group_size=g, config=_sweep_config(name, n, k, m, bits, g, cfg)
        )
        torch.cuda.synchronize()
        return None
    except Exception as exc:
        return f"warm-up {case}: {type(exc).__name__}: {exc}"


def run_sweep(copy_bw, small_only: bool = False, gemv_only: bool = False) -> list[str]:
    lines = []
    for case in sweep_cases(small_only, gemv_only):
        name, n, k, m, bits, g, cfg = case
        try:
            fn = kernel_fns()[name]
            conf = _sweep_config(name, n, k, m, bits, g, cfg)
            wb = weight_bytes(n, k, bits, g)
            copies = [packed_weight(n, k, bits, g) for _ in range(n_copies(wb))]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            kw = dict(bits=bits, in_features=k, group_size=g, config=conf)
            y = fn(x, *copies[0], None, **kw)
            ref = reference.wq_matmul(x.float(), *copies[0], None, bits=bits, in_features=k, group_size=g)
            rel = ((y.float() - ref).norm() / ref.norm()).item()
            t = graph_time_us([lambda c=c: fn(x, *c, None, **kw) for c in copies])
            nbytes = wb + 2 * m * (k + n)
            lines.append(
                f"sweep {name:5} {n:>5}x{k:<5} M={m:<2} {bits}b {conf}: {t:8.2f} us "
                f"{nbytes / (t * 1e-6) / copy_bw * 100:5.1f}% rel {rel:.1e}"
            )
        except Exception as exc:
            lines.append(f"sweep {case}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
        print(lines[-1], flush=True)
        torch.cuda.empty_cache()
    return lines


# ------------------------------------------------------------------------------------------- e2e proxy


def e2e(copy_bw) -> list[str]:
    """Decode proxy: one token through 32 layers x 7 linears (M = 1), as one CUDA graph; "+H" adds
    the rotated model's online Hadamard (14336) before each down_proj; e8p: 2-bit E8P gemv."""
    from rsq.kernels import triton_e8p as E
    from rsq.kernels import triton_hadamard as TH
    from rsq.kernels import triton_wq as T
    from rsq.quant.e8p import codes_to_int16

    lines = []
    x = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (4096, 14336)}
    scale = torch.tensor([[0.01]], device="cuda")
    for label, bits in (("bf16", None), ("4-bit", 4), ("3-bit", 3), ("4-bit+H", 4), ("e8p", "e8p"), ("e8p+H", "e8p")):
        layers = []
        total = 0
        for _ in range(32):
            for n, k in E2E_LAYER:
                if label.endswith("+H") and k == 14336:  # the rotated model's online Hadamard
                    layers.append(lambda: TH.hadamard(x[14336], 14336))
                if bits == "e8p":
                    c = codes_to_int16(torch.randint(0, 1 << 16, (n, k // 8), device="cuda"))
                    layers.append(lambda c=c, k=k: E.gemv(x[k], c, scale))
                    total += n * k // 4
                elif bits is None:
                    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                    layers.append(lambda w=w, k=k: torch.matmul(x[k], w.t()))
                    total += 2 * n * k
                else:
                    qw, s, z = packed_weight(n, k, bits, -1)
                    cfg = T.gemv_config(1, n, k, bits, -1)
                    layers.append(
                        lambda qw=qw, s=s, z=z, k=k, cfg=cfg: T.gemv(
                            x[k], qw, s, z, None, bits=bits, in_features=k, group_size=-1, config=cfg
                        )
                    )
                    total += weight_bytes(n, k, bits, -1)
        t = graph_time_us(layers, replays=5) * len(layers)  # per token (len counts the Hadamard calls too)
        lines.append(
            f"e2e proxy {label:>6}: {t / 1e3:7.3f} ms/token  {1e6 / t:7.1f} tokens/s  "
            f"{total / 1e9:5.2f} GB weights  {total / (t * 1e-6) / copy_bw * 100:5.1f}% of copy bandwidth"
        )
        print(lines[-1], flush=True)
        del layers
        torch.cuda.empty_cache()
    return lines


# ------------------------------------------------------------------------- E8P and online Hadamard


def e8p_cases(quick: bool):
    for n, k in SHAPES:
        for m in (1, 16, 2048) if quick else (1, 4, 16, 64, 2048):
            yield n, k, m


def run_e8p(quick: bool, copy_bw) -> list[dict]:
    """E8P (2 bits/weight, 16-bit code per 8 weights) kernels vs bf16 matmul, checked against the
    e8p_decode reference first."""
    from rsq.kernels import triton_e8p as T
    from rsq.quant.e8p import codes_to_int16, e8p_decode

    rows = []
    for n, k, m in e8p_cases(quick):
        nbytes_w = n * k // 4
        copies = [
            codes_to_int16(torch.randint(0, 1 << 16, (n, k // 8), device="cuda")) for _ in range(n_copies(nbytes_w))
        ]
        scale = torch.tensor([[0.01]], device="cuda")
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ (e8p_decode(copies[0].reshape(-1)).reshape(n, k) * 0.01).T
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
        t16 = graph_time_us([lambda w=w: torch.matmul(x, w.t()) for w in ws])
        del ws
        names = ["gemv", "small"] if m == 1 else ["small"] if m <= 64 else ["dequant_mm"]
        fns = {"gemv": T.gemv, "small": T.matmul_small, "dequant_mm": T.dequant_matmul}
        for name in names:
            fn = fns[name]
            y = fn(x, copies[0], scale)
            rel = ((y.float() - ref).norm() / ref.norm()).item()
            ok = bool(torch.isfinite(y).all()) and rel <= 1e-2
            t = graph_time_us([lambda c=c: fn(x, c, scale) for c in copies]) if ok else float("nan")
            nbytes = nbytes_w + 2 * m * (k + n)
            rows.append(
                dict(
                    n=n,
                    k=k,
                    m=m,
                    kernel=name,
                    us=t,
                    bf16_us=t16,
                    speedup=t16 / t,
                    ok=ok,
                    rel=rel,
                    pct=nbytes / (t * 1e-6) / copy_bw * 100,
                )
            )
            r = rows[-1]
            print(
                f"e8p {n:>5}x{k:<5} M={m:<4} {name:<10} {t:9.2f} us  bf16 {t16:9.2f} us  x{r['speedup']:5.2f}  "
                f"{r['pct']:5.1f}% copy BW  rel {rel:.1e}{'' if ok else '  FAIL'}",
                flush=True,
            )
        del copies
        torch.cuda.empty_cache()
    return rows


def run_hadamard(quick: bool, copy_bw) -> list[dict]:
    """Online Hadamard (bf16 in/out) on the sizes a rotated Llama-3-8B applies at run time:
    14336 (down_proj input), 4096, and 32 heads x 128 across heads (before o_proj). The Triton kernel
    vs the torch transform (rsq.rotation.hadamard_transform: butterflies in float32) vs the copy
    floor (read + write bytes at the measured copy bandwidth) vs the bf16 matmul it precedes."""
    from rsq.kernels import triton_hadamard as TH
    from rsq.rotation.hadamard import hadamard_transform

    rows = []
    sites = [
        ("down_proj 14336", 14336, False, 1, 4096),
        ("full 4096", 4096, False, 1, 4096),
        ("heads 32x128", 32, True, 128, 4096),
    ]
    for label, n, cross, hd, out in sites:
        width = n * hd
        for m in (1, 2048) if quick else (1, 16, 2048):
            xs = [torch.randn(m, width, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies(2 * m * width))]
            y = TH.hadamard(xs[0], n, cross, hd)
            if cross:
                ref = hadamard_transform(xs[0].float().reshape(m, n, hd).transpose(1, 2), n).transpose(1, 2)
                ref = ref.reshape(m, width)
            else:
                ref = hadamard_transform(xs[0].float(), n)
            rel = ((y.float() - ref).norm() / ref.norm()).item()
            t = graph_time_us([lambda x=x: TH.hadamard(x, n, cross, hd) for x in xs])
            if cross:

                def torch_fn(x):
                    v = x.reshape(m, n, hd).transpose(1, 2)
                    return hadamard_transform(v, n).transpose(1, 2).reshape(m, width)
            else:

                def torch_fn(x):
                    return hadamard_transform(x, n)

            t_torch = graph_time_us([lambda x=x: torch_fn(x) for x in xs])
            w = torch.randn(out, width, device="cuda", dtype=torch.bfloat16)
            t_mm = graph_time_us([lambda x=x: torch.matmul(x, w.t()) for x in xs[:4]])
            floor = 2 * 2 * m * width / copy_bw * 1e6
            rows.append(dict(site=label, m=m, us=t, torch_us=t_torch, floor_us=floor, mm_us=t_mm, rel=rel))
            print(
                f"hadamard {label:<16} M={m:<4} triton {t:8.2f} us  torch {t_torch:8.2f} us (x{t_torch / t:5.1f})  "
                f"copy floor {floor:7.2f} us  next matmul {t_mm:8.2f} us  rel {rel:.1e}",
                flush=True,
            )
            del xs
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------ libraries beside rsq's kernels

LIB_SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096)]


def _gemlite_layers(n, k, bits, g, copies):
    """gemlite (Triton, HQQ layout: W_hat = (W_q - zeros) * scales) fed rsq's own codes, so its output
    is checked against the same reference as rsq's kernels. gemlite packs 8/4/2/1 bits only."""
    from gemlite import DType, GemLiteLinear

    from rsq.quant.pack import unpack_codes

    gs = k if g == -1 else g
    layers = []
    for qw, sc, z in copies:
        layer = GemLiteLinear(
            bits, group_size=gs, in_features=k, out_features=n, input_dtype=DType.BF16, output_dtype=DType.BF16
        )
        codes = unpack_codes(qw, bits, k).to(torch.uint8)
        layer.pack(codes, sc.to(torch.bfloat16), z.to(torch.bfloat16), None)
        layers.append(layer)
    return layers


def _humming_layers(n, k, bits, g, copies):
    """humming (vLLM's JIT GEMM library): its HummingLayer quantizes W_hat (rsq's dequantized weights,
    bf16) onto its own uint<bits> grid with a zero point, then transform() repacks for its kernels.
    Its grid's scale comes from each row's min/max, so its codes may differ from rsq's by rounding:
    its output is checked against x @ W_hat^T with a looser tolerance (rel <= 0.1)."""
    from humming.layer import HummingLayer

    layers = []
    for qw, sc, z in copies:
        w_hat = reference.dequantize(qw, sc, z, bits=bits, in_features=k, group_size=g).to(torch.bfloat16)
        layer = HummingLayer(
            shape_n=n,
            shape_k=k,
            weight_config={"dtype": f"uint{bits}", "group_size": 0 if g == -1 else g, "has_zero_point": True},
            torch_dtype=torch.bfloat16,
        ).cuda()
        layer.load_from_unquantized(w_hat)
        layer.transform()
        layers.append(layer)
        del w_hat
    return layers


def run_libs(quick: bool, copy_bw) -> list[dict]:
    """rsq's dispatch choice vs gemlite vs humming vs bf16 torch.matmul, same timing (CUDA graph over
    >= 256 MB of weight copies). Load-time repack cost (seconds per layer) and bytes held are recorded."""
    import time

    from rsq.formats import get_format
    from rsq.kernels import Layer, run_backend, select_backend

    get_format("uniform")  # its file registers the uniform format's kernel backends

    rows = []
    shapes = LIB_SHAPES[:2] if quick else LIB_SHAPES
    for n, k in shapes:
        for m in (1, 16, 64, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(n_copies(2 * n * k))]
            t16 = graph_time_us([lambda w=w: torch.matmul(x, w.t()) for w in ws])
            del ws
            for bits in (4, 3):
                for g in (-1, 128):
                    wb = weight_bytes(n, k, bits, g)
                    copies = [packed_weight(n, k, bits, g) for _ in range(n_copies(wb))]
                    ref = reference.wq_matmul(x.float(), *copies[0], None, bits=bits, in_features=k, group_size=g)
                    layer = Layer("uniform", bits, g, k, n)
                    chosen = select_backend(x, layer).name
                    fns = {
                        f"rsq:{chosen}": lambda c, layer=layer: lambda: run_backend(x, c, None, layer),
                    }
                    built = {}
                    for lib, make in (("gemlite", _gemlite_layers), ("humming", _humming_layers)):
                        if lib == "gemlite" and bits == 3:
                            continue
                        try:
                            torch.cuda.synchronize()
                            t0 = time.perf_counter()
                            layers = make(n, k, bits, g, copies[:1])
                            torch.cuda.synchronize()
                            load_s = time.perf_counter() - t0
                            layers += make(n, k, bits, g, copies[1:])
                            held = sum(
                                t.numel() * t.element_size()
                                for t in list(layers[0].parameters()) + list(layers[0].buffers())
                            )
                            built[lib] = (layers, load_s, held)
                        except Exception as exc:
                            print(f"libs {lib} {n}x{k} {bits}b g={g}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
                    for name in list(fns) + list(built):
                        try:
                            if name in built:
                                layers, load_s, held = built[name]
                                calls = [lambda lay=lay: lay(x) for lay in layers]
                            else:
                                calls = [fns[name](c) for c in copies]
                                load_s, held = 0.0, wb
                            y = calls[0]()
                            if name == "humming":
                                w_hat = reference.dequantize(*copies[0], bits=bits, in_features=k, group_size=g)
                                want, tol = x.float() @ w_hat.to(torch.bfloat16).float().T, 0.1
                                del w_hat
                            else:
                                want, tol = ref, 1e-2
                            rel = ((y.float() - want).norm() / want.norm()).item()
                            ok = bool(torch.isfinite(y).all()) and rel <= tol
                            t = graph_time_us(calls) if ok else float("nan")
                        except Exception as exc:
                            err = f"{type(exc).__name__}: {str(exc)[:300]}"
                            print(f"libs {name} {n}x{k} M={m} {bits}b g={g}: FAILED {err}")
                            continue
                        rows.append(
                            dict(
                                n=n,
                                k=k,
                                m=m,
                                bits=bits,
                                g=g,
                                lib=name,
                                us=t,
                                bf16_us=t16,
                                speedup=t16 / t,
                                rel=rel,
                                ok=ok,
                                load_s=load_s,
                                bytes=held,
                                weight_bytes=wb,
                            )
                        )
                        print(
                            f"libs {n:>5}x{k:<5} M={m:<4} {bits}b g={g:<4} {name:<22} {t:9.2f} us  bf16 {t16:9.2f} us  "
                            f"x{t16 / t:5.2f}  rel {rel:.1e}  load {load_s * 1e3:.0f} ms  holds {held / wb:.2f}x rsq"
                            + ("" if ok else "  FAIL"),
                            flush=True,
                        )
                    del copies, built
                    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="4/3 bits, per channel only")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--workers", type=int, default=12, help="processes compiling kernels up front")
    ap.add_argument("--sweep", action="store_true", help="also time alternative gemv / small configurations")
    ap.add_argument("--m", type=int, default=None, help="only this token count (1, 4, 16 or 2048)")
    ap.add_argument("--sweep-small", action="store_true", help="with --sweep: only matmul_small (M = 16, 64)")
    ap.add_argument("--sweep-gemv", action="store_true", help="with --sweep: only gemv (M = 1)")
    ap.add_argument(
        "--only",
        choices=("scalar", "e8p", "hadamard", "libs", "sweep"),
        action="append",
        help="run only these sections (repeatable; default: all but libs; sweep: only --sweep's)",
    )
    ap.add_argument("--json", default=None, help="also write every row here")
    args = ap.parse_args()
    only = set(args.only or ("scalar", "e8p", "hadamard"))
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernel_speed.py needs a CUDA GPU")
    props = torch.cuda.get_device_properties(0)
    all_cases = list(cases(args.quick, args.m)) if "scalar" in only else []
    if args.workers > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            warm = list(pool.map(_warm, all_cases))
            if args.sweep:
                warm += list(pool.map(_warm_sweep, list(sweep_cases(args.sweep_small, args.sweep_gemv))))
            for err in warm:
                if err:
                    print(err, flush=True)
    copy_bw = copy_bandwidth()
    peak = matmul_tflops()
    print(
        f"device {props.name}, {props.multi_processor_count} SMs; copy bandwidth {copy_bw / 1e9:.0f} GB/s "
        f"(read+write); bf16 matmul 8192^3 {peak:.0f} TFLOP/s",
        flush=True,
    )
    sweep_lines = run_sweep(copy_bw, args.sweep_small, args.sweep_gemv) if args.sweep else []
    results, bf16_cache = [], {}
    for case in all_cases:
        try:
            run_case(case, results, copy_bw, bf16_cache)
        except Exception as exc:  # keep going: one broken case must not hide the others
            print(f"{case}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        torch.cuda.empty_cache()
    e8p_rows = run_e8p(args.quick, copy_bw) if "e8p" in only else []
    had_rows = run_hadamard(args.quick, copy_bw) if "hadamard" in only else []
    e2e_lines = [] if args.no_e2e else e2e(copy_bw)
    lib_rows = run_libs(args.quick, copy_bw) if "libs" in only else []
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(
                dict(
                    device=props.name,
                    copy_gbs=copy_bw / 1e9,
                    bf16_tflops=peak,
                    scalar=results,
                    e8p=e8p_rows,
                    hadamard=had_rows,
                    libs=lib_rows,
                    sweep=sweep_lines,
                    e2e=e2e_lines,
                ),
                f,
                indent=1,
            )

    print("\n| out x in | M | bits | group | kernel | us | bf16 us | speed-up | GB/s | % copy BW | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    best = {}
    for r in results:
        key = (r["n"], r["k"], r["m"], r["bits"], r["g"])
        if r["ok"] and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    for r in results:
        mark = "*" if best.get((r["n"], r["k"], r["m"], r["bits"], r["g"])) is r else ""
        print(
            f"| {r['n']}x{r['k']} | {r['m']} | {r['bits']} | {r['g']} | {r['kernel']}{mark} | {r['us']:.1f} | "
            f"{r['bf16_us']:.1f} | {r['speedup']:.2f} | {r['gbs']:.0f} | {r['pct']:.0f} | {r['tflops']:.0f} |"
            + ("" if r["ok"] else " FAIL")
        )
    print(f"copy bandwidth {copy_bw / 1e9:.0f} GB/s; bf16 8192^3 matmul {peak:.0f} TFLOP/s; * = fastest kernel")
    if e8p_rows:
        print("\n| E8P out x in | M | kernel | us | bf16 us | speed-up | % copy BW |")
        print("|---|---|---|---|---|---|---|")
        for r in e8p_rows:
            print(
                f"| {r['n']}x{r['k']} | {r['m']} | {r['kernel']} | {r['us']:.1f} | {r['bf16_us']:.1f} | "
                f"{r['speedup']:.2f} | {r['pct']:.0f} |" + ("" if r["ok"] else " FAIL")
            )
    if had_rows:
        print("\n| Hadamard site | M | triton us | torch us | torch/triton | copy floor us | next matmul us |")
        print("|---|---|---|---|---|---|---|")
        for r in had_rows:
            print(
                f"| {r['site']} | {r['m']} | {r['us']:.2f} | {r['torch_us']:.2f} | {r['torch_us'] / r['us']:.1f} | "
                f"{r['floor_us']:.2f} | {r['mm_us']:.2f} |"
            )
    if lib_rows:
        print("\n| libs out x in | M | bits | group | kernel | us | bf16 us | speed-up | load ms | bytes / rsq |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in lib_rows:
            print(
                f"| {r['n']}x{r['k']} | {r['m']} | {r['bits']} | {r['g']} | {r['lib']} | {r['us']:.1f} | "
                f"{r['bf16_us']:.1f} | {r['speedup']:.2f} | {r['load_s'] * 1e3:.0f} | "
                f"{r['bytes'] / r['weight_bytes']:.2f} |" + ("" if r["ok"] else " FAIL")
            )
    for line in sweep_lines:
        print(line)
    for line in e2e_lines:
        print(line)


if __name__ == "__main__":
    main()
