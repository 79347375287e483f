"""`rsq demo`: the README's main job — quantize the embedded default with several methods on a
small calibration set, evaluate, and print the perplexity table."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from rsq.cli import cmd_quantize
from rsq.cli.options import build_config, print_summary
from rsq.cli.progress import Progress
from rsq.config import EVAL_SEQLEN, EVAL_WINDOWS, TORCH_DTYPES
from rsq.io.loading import load_model

DEMO_METHODS = ("fp16", "rtn", "gptq", "quarot", "rsq")

# How much the 3-bit rows moved between machines with the same code, seed and data (float32 rounding
# differs with the CPU, the BLAS and the thread count; bench/NOTES-smollm2.md). fp16 and rtn involve
# no calibration and agreed to all printed digits.
SENSITIVITY = {
    "gptq": "note: gptq (3-bit, no rotation) is chaotic in float rounding: 333.76 and 475.96 on two CPUs with the "
    "same code and seed; a different gptq figure on your machine is expected",
    "quarot": "note: quarot moved by ~2% between machines (41.01 vs 41.89)",
    "rsq": "note: rsq moved by ~0.5% between machines (37.23 vs 37.41)",
}


def add_parsers(sub) -> None:
    d = sub.add_parser(
        "demo",
        help="quantize the embedded SmolLM2 with several methods and print the table",
        description="End-to-end run on the embedded default model (CPU friendly).",
    )
    d.add_argument(
        "--methods", default=",".join(DEMO_METHODS), help=f"comma-separated methods (default: {','.join(DEMO_METHODS)})"
    )
    d.add_argument("--bits", type=int, default=3, help="weight bits (default: 3)")
    d.add_argument("--nsamples", type=int, default=32, help="calibration windows (default: 32)")
    d.add_argument("--seqlen", type=int, default=512, help="calibration window length (default: 512)")
    d.add_argument(
        "--max-windows",
        type=int,
        default=EVAL_WINDOWS,
        help=f"perplexity windows of {EVAL_SEQLEN} tokens (default: {EVAL_WINDOWS})",
    )
    d.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    d.add_argument("--out", default="runs/demo", help="directory for the runs (default: runs/demo)")
    d.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from rsq.job.run import run_quantize

    parser = argparse.ArgumentParser(prog="rsq")  # the quantize command's own options, as `rsq quantize` parses them
    cmd_quantize.add_parsers(parser.add_subparsers(dest="command", required=True))
    runs = []
    root = Path(args.out)
    base = None  # the embedded GGUF, loaded and dequantized once; each method quantizes a copy
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        qargs = parser.parse_args(
            [
                "quantize",
                "--method",
                method,
                "--bits",
                str(args.bits),
                "--nsamples",
                str(args.nsamples),
                "--seqlen",
                str(args.seqlen),
                "--seed",
                str(args.seed),
                "--out",
                str(root / method),
            ]
        )
        cfg = build_config(qargs)
        print(f"== {method} ==", flush=True)
        if base is None or base[2] != cfg.dtype:
            base = (*load_model(cfg.model or None, TORCH_DTYPES[cfg.dtype]), cfg.dtype)
        with Progress() as progress:
            runs.append(
                run_quantize(
                    cfg,
                    root / method,
                    overwrite=True,
                    ppl_max_windows=args.max_windows,
                    progress=progress.update,
                    preloaded=(copy.deepcopy(base[0]), base[1]),
                )
            )
    print()
    print_summary(runs)
    notes = [SENSITIVITY[r["method"]] for r in runs if r["method"] in SENSITIVITY and args.bits == 3]
    for note in notes:
        print(note)
    (root / "summary.json").write_text(
        json.dumps(
            [{"method": r["method"], "perplexity": r["perplexity"], "seconds": r["timings"]["total"]} for r in runs],
            indent=2,
        )
    )
    print(f"wrote {root}/summary.json")
    return 0
