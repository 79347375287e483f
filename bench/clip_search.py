"""The MSE clip search, loop vs pruned, on the demo model's own weights (issue 32).

    PYTHONPATH=. python3 bench/clip_search.py [--layers 0,15,29] [--threads 2] [--bits 3] [--group-size -1]

For every linear of the chosen layers of the embedded SmolLM2-135M, times
rsq.quant.grid.clip_search_loop (one torch pass per candidate, the code before issue 32) and
find_params (the pruned search on the CPU) in the same run, alternating, best of --repeats each;
checks that both return the same scales and zeros bit for bit; prints per linear and totals with
the ratio, and the total scaled to the model's 30 layers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

# the repository instead of bench/ (whose kernels.py would shadow the `kernels` package transformers imports)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from rsq.config import GridConfig  # noqa: E402
from rsq.io.loading import load_model  # noqa: E402
from rsq.quant import grid as G  # noqa: E402


def best_of(fn, repeats: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,15,29")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    grid = GridConfig(bits=args.bits, group_size=args.group_size, symmetric=not args.asym)
    model, _ = load_model(None, torch.float32)
    layers = [int(i) for i in args.layers.split(",")]
    print(f"{args.threads} threads, {args.bits}-bit, group {args.group_size}, {'asym' if args.asym else 'sym'}")
    print("| linear | rows x cols | loop s | pruned s | ratio | identical |")
    print("|---|---|---|---|---|---|")
    total_loop = total_new = 0.0
    for i in layers:
        for name, mod in model.model.layers[i].named_modules():
            if not isinstance(mod, torch.nn.Linear):
                continue
            w = mod.weight.detach().float()
            if grid.group_size > 0:
                w = w.reshape(-1, grid.group_size)
            zeros = torch.zeros(w.shape[0])
            xmin = torch.minimum(w.min(dim=1).values, zeros)
            xmax = torch.maximum(w.max(dim=1).values, zeros)
            t_loop = t_new = float("inf")
            for _ in range(args.repeats):  # alternate, so that load changes hit both alike
                t, ref = best_of(lambda: G.clip_search_loop(w, xmin, xmax, grid), 1)
                t_loop = min(t_loop, t)
                t, new = best_of(lambda: G.find_params(w, grid), 1)
                t_new = min(t_new, t)
            same = torch.equal(ref[0], new[0][:, 0]) and torch.equal(ref[1], new[1][:, 0])
            total_loop, total_new = total_loop + t_loop, total_new + t_new
            shape = f"{w.shape[0]}x{w.shape[1]}"
            print(f"| {i}.{name} | {shape} | {t_loop:.3f} | {t_new:.3f} | {t_loop / t_new:.2f} | {same} |")
    scale = 30 / len(layers)
    print(
        f"\ntotal {total_loop:.2f} s loop vs {total_new:.2f} s pruned: {total_loop / total_new:.2f}x; "
        f"30 layers: {total_loop * scale:.1f} s vs {total_new * scale:.1f} s per quantizing method"
    )


if __name__ == "__main__":
    main()
