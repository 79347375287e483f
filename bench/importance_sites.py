"""Where importance weighting hurts: the weight attncon puts on the massive-activation tokens, and the
GPTQ loss with and without weighting, per layer and linear, for --online-rotations none vs export.

    PYTHONPATH=. python3 bench/importance_sites.py --out DIR [--model M] [--nsamples 8] [--seqlen 512]
        [--bits 3] [--seed 0] [--settings none,export] [--methods quarot,rsq]

Reduced protocol (issue 33): 8 calibration windows of 512 tokens of the default calibration text, no
perplexity; each (method, setting) is one ordinary `rsq.job.run.run_quantize` job (the default model,
SmolLM2-135M, takes ~1-2 min a job on 2 CPU cores). Instruments, without changing what the job
computes:

- the layer input x (B, T, d) handed to the importance function: a token is *massive* when its
  residual-stream norm is > 10x the median token norm of its sequence (the attention-sink tokens);
  ``sink_share`` = the fraction of the layer's importance weight on those tokens, against
  ``uniform_share`` = their fraction of the tokens (what uniform weighting gives them);
- every Hessian also accumulated unweighted (a shadow accumulator fed the same inputs): after each
  GPTQ solve, for D = W - W_hat, the relative loss tr(D H D^T) / tr(W H W^T) under the weighted H
  (what the solver minimised) and under the unweighted H (the output error on all tokens alike);
  for quarot (uniform) both are the same.

Prints one table per (method, setting) of the modules with the largest unweighted relative loss, a
per-linear summary, and writes DIR/importance_sites.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import rsq.importance.layer as importance_layer
import rsq.job.stages as pipeline  # where the layer stages look these names up
from rsq.checkpoint.schema import dequantize_result
from rsq.config import RSQConfig
from rsq.job.run import run_quantize
from rsq.solver.hessian import HessianAccumulator

MASSIVE = 10.0  # a token is massive when its norm is > MASSIVE x its sequence's median token norm


class Recorder:
    def __init__(self) -> None:
        self.sinks: dict[int, dict] = {}  # layer -> {sink_share, uniform_share, n_massive, max_norm_ratio}
        self.losses: dict[str, dict] = {}  # module (group) name -> {weighted, unweighted, raw}
        self.last_unweighted: torch.Tensor | None = None


REC = Recorder()


class ShadowAccumulator(HessianAccumulator):
    """The pipeline's accumulator, plus the same inputs accumulated without weights."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shadow = HessianAccumulator(*args, **kwargs)

    def add(self, x, weights=None):
        super().add(x, weights)
        self.shadow.add(x, None)

    def finalize(self):
        self.shadow.sum = self.shadow.sum.clone()
        self.shadow.nseq = self.nseq
        REC.last_unweighted = self.shadow.finalize()
        return super().finalize()


def _rel(D: torch.Tensor, W: torch.Tensor, H: torch.Tensor) -> float:
    H = H.double()
    return float(((D.double() @ H) * D.double()).sum() / ((W.double() @ H) * W.double()).sum())


def wrap_gptq(orig):
    def gptq_quantize(W, H, grid, solver, name, kernels="auto"):
        res = orig(W, H, grid, solver, name, kernels)
        D = W.float() - dequantize_result(res, grid).float().to(W.device)
        Hu = REC.last_unweighted
        REC.losses[name] = {
            "raw": float(res.loss),
            "weighted": _rel(D, W.float(), H),
            "unweighted": _rel(D, W.float(), Hu) if Hu is not None else float("nan"),
        }
        return res

    return gptq_quantize


def wrap_weight_fn(orig_make):
    def make_weight_fn(cfg, adapter, config, windows):
        fn = orig_make(cfg, adapter, config, windows)
        if fn is None:
            return None

        def weight_fn(index, layer, x, kwargs, ids):
            w = fn(index, layer, x, kwargs, ids)
            if w is not None:
                norms = x.float().norm(dim=-1)  # (B, T)
                med = norms.median(dim=-1, keepdim=True).values
                massive = norms > MASSIVE * med
                wf = w.float().to(norms.device)
                rec = REC.sinks.setdefault(
                    index, {"w_massive": 0.0, "w_all": 0.0, "n_massive": 0, "n": 0, "ratio": 0.0}
                )
                rec["w_massive"] += float(wf[massive].sum())
                rec["w_all"] += float(wf.sum())
                rec["n_massive"] += int(massive.sum())
                rec["n"] += massive.numel()
                rec["ratio"] = max(rec["ratio"], float((norms / med).max()))
            return w

        return weight_fn

    return make_weight_fn


def install() -> None:
    pipeline.HessianAccumulator = ShadowAccumulator
    pipeline.gptq_quantize = wrap_gptq(pipeline.gptq_quantize)
    importance_layer.make_weight_fn = wrap_weight_fn(importance_layer.make_weight_fn)


def short(name: str) -> str:
    # "model.layers.3.mlp.down_proj" -> "3 down"; stacked groups "a+b+c" -> "3 q+k+v"
    parts = [p.split(".") for p in name.split("+")]
    return f"{parts[0][2]} " + "+".join(p[-1].replace("_proj", "") for p in parts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", default="none,export")
    ap.add_argument("--methods", default="quarot,rsq")
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    install()
    torch.manual_seed(args.seed)
    table = {}
    for method in args.methods.split(","):
        for online in args.settings.split(","):
            REC.__init__()
            cfg = RSQConfig.for_method(
                method,
                model=args.model,
                seed=args.seed,
                grid={"bits": args.bits},
                calib={"nsamples": args.nsamples, "seqlen": args.seqlen},
                rotation={"online": online},
            )
            t0 = time.time()
            res = run_quantize(cfg, args.out / f"{method}-{online}", ppl_sources=(), overwrite=True)
            key = f"{method}-{online}"
            table[key] = {
                "seconds": time.time() - t0,
                "losses": REC.losses,
                "sinks": {str(i): v for i, v in sorted(REC.sinks.items())},
                "loss_outliers": res["loss_outliers"],
            }
            print(f"== {key} ({time.time() - t0:.0f} s), loss_outliers: {[e['module'] for e in res['loss_outliers']]}")
            report(table[key], args.top)
            sys.stdout.flush()
    (args.out / "importance_sites.json").write_text(json.dumps(table, indent=1))
    return 0


def report(cell: dict, top: int) -> None:
    losses = cell["losses"]
    sinks = cell["sinks"]
    if sinks:
        print("layer  massive tok/seq  max norm/median  uniform share  attncon share on massive tokens")
        for i, s in sinks.items():
            print(
                f"{int(i):5d}  {s['n_massive']:15d}  {s['ratio']:15.1f}  {s['n_massive'] / s['n']:13.4f}  "
                f"{s['w_massive'] / s['w_all']:.4f}"
            )
    print(f"top {top} modules by unweighted relative loss tr(D H D^T)/tr(W H W^T):")
    print("module          raw loss    rel (weighted H)  rel (unweighted H)")
    for name, v in sorted(losses.items(), key=lambda kv: -kv[1]["unweighted"])[:top]:
        print(f"{short(name):14s}  {v['raw']:10.3g}  {v['weighted']:16.3g}  {v['unweighted']:18.3g}")
    kinds: dict[str, list] = {}
    for name, v in losses.items():
        kinds.setdefault(short(name).split(" ", 1)[1], []).append(v)
    print("per linear: median / max of rel (unweighted H), median / max of rel (weighted H)")
    for kind, vs in kinds.items():
        u = [v["unweighted"] for v in vs]
        w = [v["weighted"] for v in vs]
        print(f"  {kind:10s}  {statistics.median(u):.3g} / {max(u):.3g}   {statistics.median(w):.3g} / {max(w):.3g}")


if __name__ == "__main__":
    sys.exit(main())
