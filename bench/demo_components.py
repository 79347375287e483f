"""The demo's solve components before and after issue 32, on the demo model's own weights.

    PYTHONPATH=. python3 bench/demo_components.py [--layers 0,15,29] [--threads 1,2] [--bits 3] [--group-size -1]

1. MSE clip search: for every linear of the chosen layers of the embedded SmolLM2-135M, times
   rsq.quant.grid.clip_search_loop (one torch pass per candidate, the code before issue 32) and
   find_params (the pruned search on the CPU), alternating, best of --repeats each; checks that
   both return the same scales and zeros bit for bit.
2. GPTQ: for each sequential group as the job solves it (q+k+v and gate+up stacked), times
   gptq_quantize with the column loop of before (strided columns, copied below) and with the
   current CPU sub-block, both with the current scale search, on a Hessian of random activations;
   checks identical codes and W_hat.
Prints per item and totals with the ratio, and the totals scaled to the model's 30 layers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

# the repository instead of bench/ (whose kernels.py would shadow the `kernels` package transformers imports)
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from rsq.config import GridConfig, SolverConfig  # noqa: E402
from rsq.io.loading import load_model  # noqa: E402
from rsq.quant import grid as G  # noqa: E402
from rsq.solver import gptq as GP  # noqa: E402

GROUPS = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]


def column_loop_block(ops, inner, W1, U1, S1, Z1):
    """rsq.solver.gptq._gptq_block's CPU path before issue 32 (strided columns)."""
    W1 = W1.clone()
    U1 = U1.contiguous()
    B = W1.shape[1]
    C1, Q1, E1 = torch.empty_like(W1), torch.empty_like(W1), torch.empty_like(W1)
    L1 = torch.zeros(W1.shape[0], dtype=W1.dtype)
    for j1 in range(0, B, inner):
        j2 = min(j1 + inner, B)
        for i in range(j1, j2):
            w = W1[:, i]
            c, q = ops.round(w, S1[:, i], Z1[:, i])
            C1[:, i], Q1[:, i] = c, q
            err = (w - q) / U1[i, i]
            L1 += err * err / 2
            W1[:, i:j2] -= err[:, None] * U1[i, i:j2][None, :]
            E1[:, i] = err
        if j2 < B:
            W1[:, j2:] -= E1[:, j1:j2] @ U1[j1:j2, j2:]
    return C1, Q1, E1, L1


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
    ap.add_argument("--threads", default=str(torch.get_num_threads()), help="thread counts, e.g. 1,2")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=-1)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    grid = GridConfig(bits=args.bits, group_size=args.group_size, symmetric=not args.asym)
    model, _ = load_model(None, torch.float32)
    layers = [int(i) for i in args.layers.split(",")]
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        print(f"\n## {threads} threads, {args.bits}-bit, group {args.group_size}, {'asym' if args.asym else 'sym'}\n")
        clip_components(model, layers, grid, args.repeats)
        gptq_components(model, layers, grid, args.repeats)


def clip_components(model, layers, grid, repeats: int) -> None:
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
            for _ in range(repeats):  # alternate, so that load changes hit both alike
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
        f"\nclip search total {total_loop:.2f} s loop vs {total_new:.2f} s pruned: {total_loop / total_new:.2f}x; "
        f"30 layers: {total_loop * scale:.1f} s vs {total_new * scale:.1f} s per quantizing method\n"
    )


def gptq_components(model, layers, grid, repeats: int) -> None:
    solver = SolverConfig()
    gen = torch.Generator().manual_seed(0)
    print("| group | rows x cols | gptq, column loop s | gptq, row sub-block s | ratio | identical |")
    print("|---|---|---|---|---|---|")
    total_old = total_new = 0.0
    current = GP._gptq_block
    for i in layers:
        layer = model.model.layers[i]
        for group in GROUPS:
            mods = [m for n, m in layer.named_modules() if n.split(".")[-1] in group]
            W = torch.cat([m.weight.detach().float() for m in mods])
            X = torch.randn(2048, W.shape[1], generator=gen)
            H = 2 * X.T @ X / 2048
            t_old = t_new = float("inf")
            for _ in range(repeats):
                GP._gptq_block = column_loop_block
                t, ref = best_of(lambda: GP.gptq_quantize(W, H, grid, solver), 1)
                t_old = min(t_old, t)
                GP._gptq_block = current
                t, new = best_of(lambda: GP.gptq_quantize(W, H, grid, solver), 1)
                t_new = min(t_new, t)
            same = torch.equal(ref.codes, new.codes) and torch.equal(ref.weight, new.weight)
            total_old, total_new = total_old + t_old, total_new + t_new
            shape = f"{W.shape[0]}x{W.shape[1]}"
            print(f"| {i}.{'+'.join(group)} | {shape} | {t_old:.3f} | {t_new:.3f} | {t_old / t_new:.2f} | {same} |")
    scale = 30 / len(layers)
    print(
        f"\ngptq_quantize total {total_old:.2f} s vs {total_new:.2f} s: {total_old / total_new:.2f}x; "
        f"30 layers: {total_old * scale:.1f} s vs {total_new * scale:.1f} s per GPTQ method"
    )


if __name__ == "__main__":
    main()
