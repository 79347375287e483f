"""`rsq export`: an rsq checkpoint in another runtime's format (argparse wiring, printing); the
formats and their checks are the exporter registry's (rsq/checkpoint/exporters.py)."""

from __future__ import annotations


def add_parsers(sub) -> None:
    from rsq.checkpoint.exporters import EXPORTERS

    targets = "; ".join(f"{e.name}: {e.help}" for e in EXPORTERS.values())
    p = sub.add_parser(
        "export",
        help="convert an rsq checkpoint to compressed-tensors or GPTQ (formats vLLM, SGLang and transformers load)",
        description=f"Write OUT/ with DIR's quantized linears in another runtime's layout, DIR's tokenizer files and "
        f"a model card. {targets}. Refuses, with the reason and the setting that would work, what a format cannot "
        "express (nothing is written).",
    )
    p.add_argument("ckpt", metavar="DIR", help="rsq checkpoint directory (rsq quantize --out ...)")
    p.add_argument("--format", required=True, choices=tuple(EXPORTERS), help="target format")
    p.add_argument(
        "--out",
        required=True,
        help="output directory (written to a temporary directory, then renamed)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from rsq.checkpoint.exporters import describe, export

    print(describe(export(args.ckpt, args.out, args.format, overwrite=args.overwrite), args.out))
    return 0
