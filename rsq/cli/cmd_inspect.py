"""`rsq inspect`: per-layer activation outlier statistics, before and after rotation."""

from __future__ import annotations

import json
from pathlib import Path

from rsq.calib.datasets import load_text, sample_windows, tokenize
from rsq.config import RotationConfig
from rsq.io.loading import load_model
from rsq.models.device import resolve_device
from rsq.models.registry import resolve
from rsq.report.outliers import activation_stats, compare_rotation, plot_stats, summary_table
from rsq.report.plotting import require_matplotlib


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="activation outlier statistics of every linear input (before/after rotation)",
        description="max|x|/rms and kurtosis of the inputs of each layer's linears, as a table, JSON and a PNG plot.",
    )
    p.add_argument("model", nargs="?", default=None, help="hub id, directory or .gguf (default: embedded SmolLM2)")
    p.add_argument("--rotate", action="store_true", help="also rotate a copy and compare (default: model as is)")
    p.add_argument("--rotate-seed", type=int, default=0, help="seed of the rotation (default: 0)")
    p.add_argument("--nsamples", type=int, default=4, help="text windows (default: 4)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--out", default="runs/inspect", help="output directory (default: runs/inspect)")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args) -> int:
    require_matplotlib()  # before any work: the plots are part of the output

    model, tok = load_model(args.model)
    adapter = resolve(model.config)  # the command starts from a model name: its family, looked up once
    windows = sample_windows(tokenize(tok, load_text("wikitext2").calib), args.nsamples, args.seqlen, seed=0)
    device = resolve_device(args.device)
    if args.rotate:
        stats = compare_rotation(model, adapter, windows, device, RotationConfig(enabled=True, seed=args.rotate_seed))
    else:
        stats = {"before": activation_stats(model, adapter, windows, device)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inspect.json").write_text(json.dumps(stats, indent=2))
    plot_stats(stats, out / "outliers.png")
    print("\n".join(summary_table(stats)))
    print(f"wrote {out}/inspect.json and {out}/outliers.png")
    return 0
