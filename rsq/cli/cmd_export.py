"""`rsq export`: an rsq checkpoint in another runtime's format (argparse wiring, printing)."""

from __future__ import annotations


def add_parsers(sub) -> None:
    from rsq.checkpoint.export import FORMATS

    p = sub.add_parser(
        "export",
        help="convert an rsq checkpoint to compressed-tensors or GPTQ (formats vLLM, SGLang and transformers load)",
        description="Write OUT/ with DIR's quantized linears in another runtime's layout, DIR's tokenizer files and a "
        "model card. compressed-tensors: pack-quantized int4/int8, online down_proj Hadamards of "
        "--online-rotations export as its hadamard transform. gptq: 2/3/4/8-bit GPTQ (checkpoint_format gptq), "
        "plain linears only (--online-rotations none). Refuses, with the reason, what a format cannot express.",
    )
    p.add_argument("ckpt", metavar="DIR", help="rsq checkpoint directory (rsq quantize --out ...)")
    p.add_argument("--format", required=True, choices=FORMATS, help="target format")
    p.add_argument(
        "--out",
        required=True,
        help="output directory (written to a temporary directory, then renamed)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    if args.format == "gptq":
        from rsq.checkpoint.export_gptq import export_gptq

        s = export_gptq(args.ckpt, args.out, overwrite=args.overwrite)
        group = "per channel" if s["group_size"] == -1 else f"group {s['group_size']}"
        sym = "symmetric" if s["symmetric"] else "asymmetric"
        print(
            f"wrote {args.out}/ (GPTQ, {s['bits']}-bit {sym} {group}, {s['modules']} linears, "
            f"{s['bytes'] / 2**20:.1f} MiB of weights)"
        )
        return 0
    from rsq.checkpoint.export import export_compressed_tensors

    s = export_compressed_tensors(args.ckpt, args.out, overwrite=args.overwrite)
    group = "per channel" if s["group_size"] == -1 else f"group {s['group_size']}"
    sym = "symmetric" if s["symmetric"] else "asymmetric"
    extra = f"; online Hadamard transform on {', '.join(s['transforms'])}" if s["transforms"] else ""
    floats = ", ".join(s["ignore"]) or "none"
    print(
        f"wrote {args.out}/ ({s['format']}, {s['bits']}-bit {sym} {group}, {s['modules']} "
        f"linears, {s['bytes'] / 2**20:.1f} MiB of weights; float: {floats}{extra})"
    )
    return 0
