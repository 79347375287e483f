"""Per-layer GPTQ losses of one linear across finished runs, read from their results.json (issue 33).

    python3 bench/down_proj_losses.py RUN_DIR... [--module mlp.down_proj] [--every 1] [--stats F.json]

Prints, per run: its label (method, --online-rotations, --importance-cap, --unrotated-weights,
seed), its perplexities and the loss outliers results.json recorded; then a markdown table with one
row per layer and, per run, the module's raw loss (what GPTQ minimised, under that run's weighted or
unweighted Hessian) and its relative loss (raw / tr(W H W^T), the error against the module's output
energy under the same Hessian; "kept" where --unrotated-outliers keep-float left it unquantized).
``--stats``: a bench/down_proj_inputs.py --json table, whose channel_peak per layer becomes a first
column. Raw losses of two runs compare only where both used the same
Hessian weighting; relative ones are the scale-free view. Reads files only: no model, no device.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def label(res: dict) -> str:
    cfg = res["config"]
    imp, rot = cfg["importance"], cfg["rotation"]
    parts = [res["method"]]
    if rot.get("enabled"):
        parts.append(rot.get("online", "?"))
    if imp.get("cap"):
        parts.append(f"cap{imp['cap']:g}")
    if imp.get("unrotated", "weighted") != "weighted":
        parts.append(f"unrotated-{imp['unrotated']}")
    if imp.get("unrotated_outliers", "off") != "off":
        parts.append(f"{imp['unrotated_outliers']}>{imp['outlier_ratio']:g}")
    parts.append(f"s{res['seed']}")
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--module", default="mlp.down_proj")
    ap.add_argument("--every", type=int, default=1, help="print every N-th layer (and the last)")
    ap.add_argument("--stats", type=Path, default=None, help="bench/down_proj_inputs.py --json output")
    args = ap.parse_args()
    peaks = {}
    if args.stats:
        peaks = {r["layer"]: r["channel_peak"] for r in json.loads(args.stats.read_text())["rows"]}
    runs = [json.loads((r / "results.json").read_text()) for r in args.runs]
    for path, res in zip(args.runs, runs):
        ppl = ", ".join(f"{k} {v:.2f}" for k, v in res["perplexity"].items() if k not in ("seqlen", "max_windows"))
        outliers = [f"{e['module']} ({e['ratio']:.0f}x)" for e in res.get("loss_outliers") or []]
        kept = [f"{e['module']} ({e['channel_peak']:.0f}x)" for e in res.get("kept_float") or []]
        print(
            f"- {label(res)} ({path}): perplexity {ppl}; loss outliers: {', '.join(outliers) or 'none'}; "
            f"kept in float: {', '.join(kept) or 'none'}"
        )
    print()
    heads = (["input channel_peak"] if peaks else []) + [f"{label(r)} raw | {label(r)} rel" for r in runs]
    print("| layer | " + " | ".join(heads) + " |")
    print("|---|" + ("---|" if peaks else "") + "---|---|" * len(runs))
    n = min(len(r["layers"]) for r in runs)
    for i in range(n):
        if i % args.every and i != n - 1:
            continue
        cells = [f"{peaks[i]:.1f}"] if peaks else []
        for r in runs:
            layer = r["layers"][i]
            if ((layer.get("sites") or {}).get(args.module) or {}).get("kept"):
                cells.append("kept | kept")
                continue
            raw = layer["losses"].get(args.module, float("nan"))
            rel = (layer.get("rel_losses") or {}).get(args.module, float("nan"))
            cells.append(f"{raw:.3g} | {rel:.4f}")
        print(f"| {i} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
