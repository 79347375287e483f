"""`rsq ablate` and `rsq plan`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from rsq.cli.options import add_quantize_options, build_config, pad_width_arg
from rsq.cli.progress import Progress
from rsq.config import EVAL_SEQLEN, EVAL_WINDOWS, RSQConfig
from rsq.io.loading import load_config
from rsq.models.bundled import list_bundled, load_bundled_config
from rsq.models.registry import resolve
from rsq.plan.memory import format_plan
from rsq.report.plotting import require_matplotlib
from rsq.rotation.pad import padded_config


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "ablate",
        help="grid of methods x importance strategies x seeds, with table and plots",
        description="Run every (method, strategy, seed) cell as a quantize run under OUT/, then write "
        "OUT/results.json, OUT/table.md, OUT/ppl.png and OUT/importance.png. Cells already done are kept.",
    )
    add_quantize_options(p)
    p.add_argument("--methods", default="gptq,quarot,rsq", help="comma-separated methods (default: gptq,quarot,rsq)")
    p.add_argument("--strategies", default="attncon", help="importance strategies for the rsq cells (default: attncon)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument(
        "--gpus", type=int, default=None, help="run cells in parallel, one per GPU (default: all visible GPUs)"
    )
    p.add_argument(
        "--max-windows", type=int, default=EVAL_WINDOWS, help=f"perplexity windows (default: {EVAL_WINDOWS})"
    )
    p.add_argument(
        "--ppl-seqlen", type=int, default=EVAL_SEQLEN, help=f"perplexity window length (default: {EVAL_SEQLEN})"
    )
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=cmd_ablate)

    q = sub.add_parser(
        "plan",
        help="rotation sites and memory per rank for a model, from its config alone",
        description="MODEL is a bundled config name (see --list), a hub id, a directory or a .gguf file.",
    )
    q.add_argument("model", nargs="?", default=None, help="model or bundled config name (default: embedded SmolLM2)")
    q.add_argument("--list", action="store_true", help="list the bundled configs")
    q.add_argument("--all", action="store_true", help="plan every bundled config")
    q.add_argument("--nsamples", type=int, default=256, help="calibration windows (default: 256)")
    q.add_argument("--seqlen", type=int, default=4096, help="tokens per window (default: 4096)")
    q.add_argument("--bits", type=int, default=3, help="weight bits (default: 3)")
    q.add_argument("--ranks", default="1", help="comma-separated numbers of ranks/GPUs (default: 1)")
    q.add_argument(
        "--pad-mlp",
        default="auto",
        metavar="WIDTH|auto|0",
        type=pad_width_arg,
        help="the MLP width planned for, as `rsq quantize --pad-mlp` (default: auto, what --method rsq runs: "
        "under the default export rotation a width whose power-of-two block is below 1024 is padded)",
    )
    q.add_argument(
        "--host-memory",
        type=float,
        default=128.0,
        metavar="GiB",
        help="host memory to check the predicted host peaks against (default: 128, the GPU machine's)",
    )
    q.set_defaults(func=cmd_plan)


def cmd_ablate(args) -> int:
    require_matplotlib()  # before any work: the plots are part of the output
    import torch

    from rsq.job.ablate import (
        grid_cells,
        markdown_table,
        plot_importance,
        plot_ppl,
        run_grid,
        summarize,
    )

    base = build_config(args)
    cells = grid_cells(base, _split(args.methods), _split(args.strategies), [int(s) for s in _split(args.seeds)])
    gpus = args.gpus if args.gpus is not None else torch.cuda.device_count()
    out = Path(args.out)
    with Progress() as progress:
        runs = run_grid(
            cells,
            out,
            gpus=gpus,
            ppl_max_windows=args.max_windows,
            ppl_seqlen=args.ppl_seqlen,
            progress=progress.update,
        )
    rows = summarize(runs)
    (out / "results.json").write_text(json.dumps({"cells": runs, "summary": rows}, indent=2))
    table = markdown_table(rows)
    (out / "table.md").write_text(table)
    plot_ppl(rows, out / "ppl.png")
    first = next((name for name, cfg in cells if cfg.importance.strategy != "uniform"), None)
    if first:
        plot_importance(out / first, out / "importance.png")
    print(table)
    print(f"wrote {out}/results.json, table.md, ppl.png" + (", importance.png" if first else ""))
    return 0


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_plan(args) -> int:
    if args.list or args.all:
        names = list_bundled()
        if args.list:
            print("\n".join(names))
            return 0
        targets = [(n, load_bundled_config(n)) for n in names]
    else:
        targets = [(args.model or "SmolLM2-135M-Instruct", _config_for(args.model))]
    rotation = replace(RSQConfig.for_method("rsq").rotation, pad_mlp=args.pad_mlp)
    for name, config in targets:
        planned = padded_config(config, rotation)  # the MLP the quantization runs on (its memory)
        for ranks in [int(r) for r in _split(args.ranks)]:
            print(
                "\n".join(
                    format_plan(
                        f"{name} (ranks={ranks})",
                        planned,
                        resolve(config),  # `rsq plan` starts from a config: one lookup per model
                        padded_from=None if planned is config else config.intermediate_size,
                        nsamples=args.nsamples,
                        seqlen=args.seqlen,
                        bits=args.bits,
                        ranks=ranks,
                        host_GiB=args.host_memory,
                    )
                )
            )
            print()
    return 0


def _config_for(model):
    if model and model in list_bundled():
        return load_bundled_config(model)
    return load_config(model)
