"""Search humming-kernels' schedule space for rsq's decode shapes: is its built-in heuristic the
fastest kernel it can build at the batch sizes rsq serves?

    python3 bench/humming_tune.py [--bits 3,4] [--m 16] [--samples 24] [--json FILE]

For each Llama-3-8B linear shape (out x in), weight width and token count M: a ``HummingLayer`` with
random codes in rsq's layout (uint<bits> with zero points, per channel, bf16), transformed as
rsq/kernels/humming_backend.py does; then

* the default: humming's own heuristic for that M (what rsq runs today);
* ``--samples`` legal schedules drawn by humming's own sampler (humming.testing.tuning), each JIT
  built, checked against the default's output (rel <= 1e-2: the same codes, only the schedule
  differs) and timed;
* bf16 ``torch.matmul`` on the same shape in the same run.

Timing: enough copies of the weights to exceed 256 MB (no L2 reuse), one CUDA graph that runs the
matmul over every copy, median of 9 replays; time per matmul = graph time / copies. Speed-ups are
bf16 time / kernel time. The best schedule per case is printed as JSON (``--json``), ready to be
passed as humming's ``tuning_config`` interval for that M.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)}


def make_layer(n: int, k: int, bits: int, gen: torch.Generator):
    from humming.layer import HummingLayer

    from rsq.kernels.humming_backend import _pack_zeros_n

    words = k * bits // 32
    qweight = torch.randint(-(2**31), 2**31 - 1, (n, words), dtype=torch.int32, device="cuda", generator=gen)
    scales = (torch.rand(n, 1, device="cuda", generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    qzeros = torch.full((n, 1), 2 ** (bits - 1), dtype=torch.uint8, device="cuda")
    layer = HummingLayer(
        shape_n=n,
        shape_k=k,
        weight_config={"dtype": f"uint{bits}", "group_size": 0, "has_zero_point": True},
        has_bias=False,
        torch_dtype=torch.bfloat16,
    ).to("cuda")
    layer.load_from_tensors({"weight": qweight, "weight_scale": scales, "zero_point": _pack_zeros_n(qzeros, bits)})
    layer.transform()
    return layer


def graph_time(fn, copies: int) -> float:
    """Seconds per call of ``fn(i)`` over i in range(copies), from a CUDA graph (median of 9)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(copies):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(9):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / copies)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--m", default="16")
    ap.add_argument("--shapes", default="gate_up,down,qkv,o")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--deadline", type=float, default=1e9, help="stop sampling after this many seconds")
    ap.add_argument("--json")
    args = ap.parse_args()
    from humming.config import ComputeConfig
    from humming.testing.tuning import sample_test_tuning_configs
    from humming.tune import get_heuristics_config

    t_start = time.perf_counter()
    gen = torch.Generator(device="cuda").manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    results = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        for bits in (int(b) for b in args.bits.split(",")):
            copies = max(2, -(-(256 << 20) // (n * k * bits // 8)))
            layers = [make_layer(n, k, bits, gen) for _ in range(copies)]
            dense = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(max(2, copies // 4))]
            lc = layers[0].humming_config
            for m in (int(v) for v in args.m.split(",")):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                t_bf16 = graph_time(lambda i: x @ dense[i], len(dense))
                default = get_heuristics_config(lc, shape_m=m)
                want = layers[0](x, tuning_config=default).float()
                t_def = graph_time(lambda i: layers[i](x, tuning_config=default), copies)
                row = {"shape": name, "n": n, "k": k, "bits": bits, "m": m, "bf16_us": t_bf16 * 1e6}
                row.update(default_us=t_def * 1e6, default_x=t_bf16 / t_def, default=default)
                best, t_best, tried, failed = default, t_def, 0, 0
                cands = sample_test_tuning_configs(lc, ComputeConfig(gemm_type="dense"), sample_size=args.samples)
                for cfg in cands:
                    if time.perf_counter() - t_start > args.deadline:
                        break
                    tried += 1
                    try:
                        y = layers[0](x, tuning_config=cfg).float()
                        rel = ((y - want).norm() / want.norm()).item()
                        if not rel <= 1e-2:
                            failed += 1
                            continue
                        t = graph_time(lambda i, c=cfg: layers[i](x, tuning_config=c), copies)
                    except Exception:  # an illegal schedule for this shape: skip it
                        failed += 1
                        continue
                    if t < t_best:
                        best, t_best = cfg, t
                row.update(best_us=t_best * 1e6, best_x=t_bf16 / t_best, best=best, tried=tried, failed=failed)
                results.append(row)
                print(
                    f"{name:8s} {n}x{k} {bits}-bit M={m:3d}: bf16 {t_bf16 * 1e6:7.1f} us | humming default "
                    f"{t_def * 1e6:6.1f} us ({t_bf16 / t_def:.2f}x) | best of {tried} ({failed} failed) "
                    f"{t_best * 1e6:6.1f} us ({t_bf16 / t_best:.2f}x)  [{time.perf_counter() - t_start:.0f} s]",
                    flush=True,
                )
            layers = dense = None  # free the copies before the next shape
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
