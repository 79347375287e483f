"""Massive activations at the down_proj input, per layer: the statistics ``--unrotated-outliers`` reads.

    PYTHONPATH=. python3 bench/down_proj_inputs.py [--model M] [--nsamples 8] [--seqlen 256] [--seed 0] [--json F]

Under ``--online-rotations none`` no rotation reaches the ``down_proj`` input: it is the MLP's own
intermediate activation act(gate(x)) * up(x), the same as in the unrotated model (the residual
rotation is folded into gate/up and cancels). So the statistics of that input can be read from the
full-precision model itself, with a forward hook, on the run's calibration windows (the same
sampling as ``rsq quantize``: wikitext2 calibration split, ``--seed``). Per layer, over the N x T
calibration tokens (rsq.importance.sites.input_stats, what the pipeline records):

- ``channel_peak``: max_j a_j / median_j a_j with a_j = max_t |x_tj| (one channel's peak against the
  typical channel's peak): a single channel carrying a massive activation;
- ``token_norm``: max_t ||x_t|| / median_t ||x_t|| (rotation-invariant: also large where the site
  is rotated, so it cannot tell which sites hurt without rotation).

Prints one row per layer and optionally writes the table as JSON. No quantization.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from rsq.calib.datasets import load_text, sample_windows, tokenize
from rsq.importance.sites import InputStats
from rsq.io.loading import load_model
from rsq.models.registry import resolve


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2 GGUF)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", default=None, help="write the per-layer table here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    adapter = resolve(model.config)
    windows = sample_windows(tokenize(tok, load_text("wikitext2").calib), args.nsamples, args.seqlen, args.seed)
    layers = adapter.get_layers(model)
    stats = [InputStats() for _ in layers]
    hooks = [
        layer.get_submodule(adapter.down_proj).register_forward_pre_hook(lambda m, a, s=s: s.add(a[0]) and None)
        for layer, s in zip(layers, stats)
    ]
    with torch.no_grad():
        for a in range(0, windows.shape[0], args.batch_size):
            model(windows[a : a + args.batch_size])
    for h in hooks:
        h.remove()
    rows = [{"layer": i, **s.summary()} for i, s in enumerate(stats)]
    print(
        f"{args.model or 'SmolLM2-135M (embedded)'}: {args.nsamples} x {args.seqlen} tokens, seed {args.seed}, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    print("| layer | channel_peak | token_norm | channel |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['channel_peak']:.1f} | {r['token_norm']:.1f} | {r['channel']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "rows": rows}, f, indent=1
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
