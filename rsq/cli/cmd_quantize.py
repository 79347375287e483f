"""`rsq quantize`: quantize a model layer by layer into a packed checkpoint + results.json."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rsq.cli.interrupt import INTERRUPT_HINT
from rsq.cli.options import add_ppl_options, add_quantize_options, build_config, max_windows, ppl_sources, print_summary
from rsq.cli.progress import Progress
from rsq.distributed import init_from_env, shutdown
from rsq.io.hub import push_folder
from rsq.models.device import resolve_device
from rsq.plan.preflight import check_lengths, check_nproc


def add_parsers(sub) -> None:
    q = sub.add_parser(
        "quantize",
        help="quantize a model and write a checkpoint + results.json",
        description="Quantize MODEL layer by layer and write OUT/ (results.json, weights, tokenizer).",
    )
    add_quantize_options(q)
    q.add_argument("--out", required=True, help="output directory (written atomically)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run into the same --out")
    q.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out, and discard an unfinished OUT.partial/ instead of resuming it",
    )
    q.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO",
        help="after writing --out, upload it to this hub repository (as `rsq push OUT REPO`)",
    )
    q.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel ranks (torchrun; one per GPU, gloo on CPU); "
        "also works when started by torchrun directly (default: 1)",
    )
    q.add_argument(
        "--in-memory",
        action="store_true",
        help="load the whole model into host memory; by default a local directory of safetensors weights is "
        "streamed layer by layer (host memory about three layers, whatever the model's size)",
    )
    add_ppl_options(q, "--ppl-seqlen")
    q.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> int:
    import os

    from rsq.job.run import run_quantize

    cfg = build_config(args)
    check_nproc(args.nproc)
    check_lengths(ppl_seqlen=args.ppl_seqlen, ppl_max_windows=max_windows(args), ppl_batch_size=args.ppl_batch_size)
    resolve_device(cfg.device)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_ranks(args.nproc)
    ctx = init_from_env("cuda" if cfg.device in ("auto", "cuda") and _has_cuda() else "cpu")
    out = Path(args.out)

    INTERRUPT_HINT["out"] = out
    try:
        with Progress() as progress:
            results = run_quantize(
                cfg,
                out,
                resume=args.resume,
                overwrite=args.overwrite,
                ppl_sources=ppl_sources(args.ppl),
                ppl_seqlen=args.ppl_seqlen,
                ppl_max_windows=max_windows(args),
                ppl_batch_size=args.ppl_batch_size,
                force_seqlen=args.force_seqlen,
                progress=progress.update if ctx.is_main else None,
                dist_ctx=ctx,
                stream=False if args.in_memory else None,
            )
    finally:
        shutdown(ctx)
    if ctx.is_main:
        print_summary([results])
        print(f"wrote {out}/ (results.json, model, tokenizer)")
        if args.push_to_hub:
            print(f"pushed to {push_folder(out, args.push_to_hub)}")
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _launch_ranks(nproc: int) -> int:
    """Re-run this command under torchrun with ``nproc`` ranks (one per GPU, or gloo on CPU)."""
    import subprocess

    argv = [a for a in sys.argv[1:]]
    i = argv.index("--nproc")
    del argv[i : i + 2]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "rsq",
        *argv,
    ]
    return subprocess.call(cmd)
