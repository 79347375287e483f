"""Where GPTQ's solve time goes, per Llama-3-8B linear group (issue 7's largest stage).

    python3 bench/solve_profile.py [--device cuda] [--scale 1] [--bits 3] [--repeats 2]

For each group the pipeline solves in one GPTQ call (q+k+v stacked 6144x4096, o 4096x4096, gate+up
stacked 28672x4096, down 4096x14336; widths divided by --scale), with random weights and a random
positive definite Hessian, it times: the per-row scale search (find_params with the MSE clip, 80
shrink factors), the damped inverse Cholesky, and the whole gptq_quantize call (first call includes
the CUDA-graph capture for a new shape; later calls are what layers 2..32 pay). Scales and Cholesky
are the fastest of --repeats calls. "loop" = the last gptq call minus those two: the column loops
and the block products. Prints a table and the per-layer sum.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rsq.config import GridConfig, SolverConfig  # noqa: E402
from rsq.quant.grid import find_params  # noqa: E402
from rsq.solver.gptq import damped_inverse_cholesky, gptq_quantize, prepare_hessian  # noqa: E402

GROUPS = [("q+k+v", 6144, 4096), ("o", 4096, 4096), ("gate+up", 28672, 4096), ("down", 4096, 14336)]


def timed(fn, sync):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=int, default=1, help="divide every width by this (CPU smoke: 8)")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2, help="gptq_quantize calls per group (first captures graphs)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    grid, solver = GridConfig(bits=args.bits), SolverConfig()
    g = torch.Generator(device=dev).manual_seed(0)
    print(
        f"device {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, widths / {args.scale}, "
        f"{args.bits}-bit per channel, MSE clip",
        flush=True,
    )
    print("| group | rows x cols | scales s | cholesky s | gptq first s | gptq again s | loop (again) s |")
    print("|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0, 0.0, 0.0]
    for name, rows, cols in GROUPS:
        rows, cols = rows // args.scale, cols // args.scale
        W = torch.randn(rows, cols, device=dev, generator=g)
        X = torch.randn(2 * cols, cols, device=dev, generator=g)
        H = X.T @ X / X.shape[0]
        del X
        t_scale = min(timed(lambda: find_params(W, grid), sync)[0] for _ in range(args.repeats))
        t_chol = min(
            timed(
                lambda: damped_inverse_cholesky(
                    prepare_hessian(W.clone(), H.clone())[1], solver.damp_frac, solver.damp_retries
                ),
                sync,
            )[0]
            for _ in range(args.repeats)
        )
        calls = [timed(lambda: gptq_quantize(W.clone(), H.clone(), grid, solver), sync)[0] for _ in range(args.repeats)]
        again = calls[-1]
        loop = again - t_scale - t_chol
        for i, v in enumerate((t_scale, t_chol, again, loop)):
            totals[i] += v
        print(
            f"| {name} | {rows}x{cols} | {t_scale:.3f} | {t_chol:.3f} | {calls[0]:.3f} | {again:.3f} | {loop:.3f} |",
            flush=True,
        )
    print(f"| per layer | | {totals[0]:.3f} | {totals[1]:.3f} | | {totals[2]:.3f} | {totals[3]:.3f} |")


if __name__ == "__main__":
    main()
