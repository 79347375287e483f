"""`rsq` command line: quantize | eval | demo | ... . All user I/O, logging and progress bars live here.

Defaults are not repeated here: an option left unset keeps the config dataclass's default
(rsq/config.py), and --help shows that default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path

from rsq import jsonsafe
from rsq.cli.progress import Progress
from rsq.config import (
    DTYPES,
    EVAL_SEQLEN,
    EVAL_WINDOWS,
    KERNELS,
    ONLINE_SETTINGS,
    CalibConfig,
    GridConfig,
    ImportanceConfig,
    RotationConfig,
    RSQConfig,
    SolverConfig,
)
from rsq.errors import RSQError

log = logging.getLogger("rsq")


def _default(cls, name: str):
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default
    raise KeyError(name)


def _opt(parser, flag: str, cls, field: str, help: str, **kw) -> None:
    parser.add_argument(
        flag,
        dest=f"{cls.__name__}.{field}",
        default=None,
        metavar=field.upper(),
        help=f"{help} (default: {_default(cls, field)})",
        **kw,
    )


def add_quantize_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id, local Hugging Face directory or .gguf file (default: embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a YAML or JSON recipe (RSQConfig fields, e.g. `method: rsq` and `grid: {bits: 3}`); "
        "options given on the command line override it",
    )
    p.add_argument(
        "--method",
        default=None,
        choices=["fp16", "rtn", "gptq", "quarot", "rsq"],
        help="fp16: no quantization; rtn: round to nearest; gptq; quarot: rotate + gptq; "
        "rsq: rotate + attention-concentration scaling + gptq (default: rsq, or the --config recipe's)",
    )
    _opt(p, "--bits", GridConfig, "bits", "weight bits: 2, 3, 4 or 8 (e8p: 2)", type=int)
    _opt(p, "--group-size", GridConfig, "group_size", "columns per scale group; -1 = per output channel", type=int)
    p.add_argument("--asym", action="store_true", help="asymmetric grid with integer zero points (default: symmetric)")
    p.add_argument("--no-clip", action="store_true", help="disable the MSE clipping search (spec §1)")
    _opt(p, "--grid", GridConfig, "kind", "number format: uniform, nf (NormalFloat) or e8p (2-bit lattice)")
    p.add_argument("--act-order", action="store_true", help="GPTQ columns by decreasing Hessian diagonal")
    _opt(p, "--block-size", SolverConfig, "block_size", "GPTQ block size", type=int)
    _opt(p, "--damp", SolverConfig, "damp_frac", "GPTQ damping, fraction of the mean Hessian diagonal", type=float)
    _opt(
        p,
        "--hessian-dtype",
        SolverConfig,
        "hessian_dtype",
        "Hessian accumulation precision: float32 or "
        "float64 (float64 makes data-parallel ranks give the 1-process weights bit for bit)",
        choices=["float32", "float64"],
    )
    _opt(p, "--calib", CalibConfig, "source", "calibration text: wikitext2, c4 or a path to a text file")
    _opt(p, "--nsamples", CalibConfig, "nsamples", "calibration windows", type=int)
    _opt(p, "--seqlen", CalibConfig, "seqlen", "tokens per calibration window", type=int)
    _opt(
        p,
        "--data-dir",
        CalibConfig,
        "data_dir",
        "directory with wiki.test.raw (and wiki.train.raw) and/or the c4 "
        "shards c4-validation.00000-of-00008.json.gz, c4-train.00000-of-01024.json.gz; also $RSQ_DATA_DIR",
    )
    p.add_argument("--rotate", dest="rotate", action="store_true", default=None, help="force the Hadamard rotation on")
    p.add_argument(
        "--no-rotate", dest="rotate", action="store_false", help="skip the rotation (e.g. rsq without rotation)"
    )
    _opt(p, "--rotate-seed", RotationConfig, "seed", "seed of the random Hadamard signs", type=int)
    _opt(p, "--rotate-mode", RotationConfig, "mode", "hadamard or random (orthogonal)")
    _opt(
        p,
        "--online-rotations",
        RotationConfig,
        "online",
        "run-time rotations: exact (down_proj Hadamard + cross-head before o_proj), export (down_proj as a "
        "block-diagonal Sylvester Hadamard that compressed-tensors/vLLM reproduce; no cross-head) or none (only "
        "rotations folded into the weights: the original architecture, any engine runs it)",
        choices=ONLINE_SETTINGS,
    )
    p.add_argument(
        "--center-embeddings",
        action="store_true",
        help="subtract each embedding row's mean, as the reference code does (not function-preserving)",
    )
    _opt(
        p,
        "--importance",
        ImportanceConfig,
        "strategy",
        "token importance: attncon, actnorm, actdiff, tokenfreq, tokensim, firstn, firstlastn, a_b_..._N, uniform "
        "(default for --method rsq: attncon)",
    )
    _opt(p, "--r-min", ImportanceConfig, "r_min", "smallest token weight before renormalisation", type=float)
    _opt(p, "--r-max", ImportanceConfig, "r_max", "largest token weight before renormalisation", type=float)
    _opt(
        p, "--normalize", ImportanceConfig, "normalize", "attncon: divide by #queries seeing a token: none|linear|sqrt"
    )
    _opt(p, "--power", ImportanceConfig, "power", "raise raw scores to this power", type=float)
    _opt(p, "--quantile", ImportanceConfig, "quantile", "min-max on the q and 1-q quantiles", type=float)
    _opt(p, "--expand", ImportanceConfig, "expand", "dataset expansion factor F (cyclic rolls, spec §5)", type=int)
    p.add_argument(
        "--seed", type=int, default=None, help="seed of calibration sampling and every random choice (default: 0)"
    )
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default=None, help="model dtype: float32, bfloat16, float16 (default: float32)")
    p.add_argument("--batch-size", type=int, default=None, help="calibration sequences per forward (default: 8)")
    p.add_argument(
        "--kernels",
        default=None,
        choices=KERNELS,
        help="auto: Triton kernels on CUDA where they apply; reference: the torch code everywhere (default: auto)",
    )
    p.add_argument("--offload", default=None, help="calibration activations: auto, device, cpu or disk (default: auto)")
    p.add_argument(
        "--save-dtype",
        default=None,
        choices=["auto", *DTYPES],
        help="dtype of the checkpoint's unquantized tensors (embeddings, lm_head, norms); auto = the "
        "source's own 16-bit dtype for a float32 run (config.json's dtype; float16 for GGUF sources, "
        "whose blocks hold float16 values), else --dtype. A 16-bit choice halves them; the checkpoint "
        "then differs from the in-memory model (whose perplexity results.json reports) by that "
        "rounding; quantization scales keep --dtype (default: auto)",
    )


def add_ppl_options(p: argparse.ArgumentParser, flag_seqlen: str) -> None:
    p.add_argument(
        "--ppl",
        default="wikitext2",
        help="perplexity sources, comma separated (wikitext2, c4 or text files); 'none' to skip (default: wikitext2)",
    )
    p.add_argument(
        flag_seqlen,
        dest="ppl_seqlen",
        type=int,
        default=EVAL_SEQLEN,
        help=f"perplexity window length (default: {EVAL_SEQLEN})",
    )
    p.add_argument(
        "--max-windows",
        type=int,
        default=EVAL_WINDOWS,
        help=f"at most this many windows; 0 = all (default: {EVAL_WINDOWS})",
    )
    p.add_argument(
        "--ppl-batch-size",
        type=int,
        default=None,
        help="perplexity windows per forward (default: the most, up to 4, that fits in memory)",
    )
    p.add_argument(
        "--force-seqlen",
        action="store_true",
        help="allow window lengths beyond the model's max_position_embeddings",
    )


_SECTION = {
    GridConfig.__name__: "grid",
    SolverConfig.__name__: "solver",
    RotationConfig.__name__: "rotation",
    ImportanceConfig.__name__: "importance",
    CalibConfig.__name__: "calib",
}


def build_config(args: argparse.Namespace) -> RSQConfig:
    """Namespace -> RSQConfig: the --config recipe (if any), then every option the user set on top;
    the rest keeps the dataclass defaults and the method's presets (rsq/recipe.py)."""
    from rsq.recipe import config_from_recipe, read_recipe

    data = read_recipe(args.config) if getattr(args, "config", None) else {}
    sections = {name: dict(data.get(name) or {}) for name in _SECTION.values()}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            cls, field = key.split(".")
            sections[_SECTION[cls]][field] = value
    if args.asym:
        sections["grid"]["symmetric"] = False
    if args.no_clip:
        sections["grid"]["mse_clip"] = False
    if args.act_order:
        sections["solver"]["act_order"] = True
    if args.rotate is not None:
        sections["rotation"]["enabled"] = args.rotate
    if args.center_embeddings:
        sections["rotation"]["center_embeddings"] = True
    for k in ("seed", "device", "dtype", "batch_size", "offload", "save_dtype", "kernels", "method"):
        if getattr(args, k, None) is not None:
            data[k] = getattr(args, k)
    if args.model is not None or "model" not in data:
        data["model"] = args.model or ""
    return config_from_recipe({**data, **sections})


def _sources(text: str) -> tuple[str, ...]:
    return () if text.strip().lower() == "none" else tuple(s.strip() for s in text.split(",") if s.strip())


def cmd_quantize(args: argparse.Namespace) -> int:
    import os

    from rsq.distributed import init_from_env, shutdown
    from rsq.pipeline import resolve_device
    from rsq.preflight import check_lengths, check_nproc
    from rsq.run import run_quantize

    cfg = build_config(args)
    check_nproc(args.nproc)
    check_lengths(ppl_seqlen=args.ppl_seqlen, ppl_max_windows=_max_windows(args), ppl_batch_size=args.ppl_batch_size)
    resolve_device(cfg.device)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch_ranks(args.nproc)
    ctx = init_from_env("cuda" if cfg.device in ("auto", "cuda") and _has_cuda() else "cpu")
    out = Path(args.out)
    _INTERRUPT_HINT["out"] = out
    try:
        with Progress() as progress:
            results = run_quantize(
                cfg,
                out,
                resume=args.resume,
                overwrite=args.overwrite,
                ppl_sources=_sources(args.ppl),
                ppl_seqlen=args.ppl_seqlen,
                ppl_max_windows=_max_windows(args),
                ppl_batch_size=args.ppl_batch_size,
                force_seqlen=args.force_seqlen,
                progress=progress.update if ctx.is_main else None,
                dist_ctx=ctx,
            )
    finally:
        shutdown(ctx)
    if ctx.is_main:
        print_summary([results])
        print(f"wrote {out}/ (results.json, model, tokenizer)")
        if args.push_to_hub:
            from rsq.hub import push_folder

            print(f"pushed to {push_folder(out, args.push_to_hub)}")
    return 0


def _max_windows(args: argparse.Namespace) -> int | None:
    """--max-windows: 0 means all (None); a negative count is an error."""
    from rsq.errors import ConfigError

    if args.max_windows < 0:
        raise ConfigError(f"--max-windows {args.max_windows} is invalid: use a positive count, or 0 for all windows")
    return args.max_windows or None


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


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity; with --tasks the lm-eval tasks instead (as `rsq lm-eval`), plus perplexity when --ppl is given."""
    from rsq.evaluate import run_eval
    from rsq.pipeline import resolve_device
    from rsq.preflight import check_lengths

    ppl = args.ppl if args.ppl is not None else ("none" if args.tasks else "wikitext2")
    if _sources(ppl):
        check_lengths(
            ppl_seqlen=args.ppl_seqlen,
            ppl_max_windows=_max_windows(args),
            ppl_batch_size=args.ppl_batch_size,
            seqlen_flag="--seqlen",
        )
    resolve_device(args.device or "auto")
    if args.json_out:
        from rsq.preflight import check_file_target

        check_file_target(Path(args.json_out), "--json-out")
    if args.tasks and _sources(ppl) and args.json_out:
        from rsq.errors import ConfigError

        raise ConfigError(
            "--json-out with both --tasks and --ppl: run rsq eval once per kind (each writes its own "
            "JSON for rsq report)"
        )
    loaded = None
    if args.tasks and _sources(ppl):  # one load for both (with --dtype applied, as lm-eval sees it)
        from rsq.cli.evalcmds import _load

        loaded = _load(args.model, args.dtype, packed=getattr(args, "packed", False))
    if _sources(ppl):
        with Progress() as progress:
            results = run_eval(
                args.model,
                _sources(ppl),
                args.ppl_seqlen,
                _max_windows(args),
                device=args.device or "auto",
                data_dir=args.data_dir,
                progress=progress.update,
                loaded=loaded,
                batch_size=args.ppl_batch_size,
                force_seqlen=args.force_seqlen,
            )
        print(jsonsafe.dumps(results["perplexity"], indent=2))
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(jsonsafe.dumps(results, indent=2))
            print(f"wrote {args.json_out}")
    if args.tasks:
        from rsq.cli.evalcmds import cmd_lm_eval

        return cmd_lm_eval(args, loaded)
    return 0


def print_summary(runs: list[dict]) -> None:
    """One line per run: method, bits, perplexities, time."""
    header = (
        f"{'method':<10} {'bits':>4} {'seed':>4} "
        + " ".join(f"{'ppl ' + s:>16}" for s in _ppl_keys(runs))
        + f" {'time s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in runs:
        bits = "16" if r["method"] == "fp16" else str(r["config"]["grid"]["bits"])
        ppl = " ".join(f"{r['perplexity'].get(s, float('nan')):>16.2f}" for s in _ppl_keys(runs))
        print(f"{r['method']:<10} {bits:>4} {r['seed']:>4} {ppl} {r['timings']['total']:>8.1f}")


def _ppl_keys(runs: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in runs:
        for k in r["perplexity"]:
            if k not in ("seqlen", "max_windows") and k not in keys:
                keys.append(k)
    return keys


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rsq", description="RSQ: Rotate, Scale, then Quantize LLMs to 2-4-bit weights."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

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
    add_ppl_options(q, "--ppl-seqlen")
    q.set_defaults(func=cmd_quantize)

    from rsq.cli.evalcmds import add_lm_eval_options

    e = sub.add_parser(
        "eval",
        help="perplexity (and lm-eval tasks) of a model or quantized checkpoint",
        description="Evaluate MODEL_OR_DIR (hub id, directory, .gguf, or rsq checkpoint): "
        "perplexity, or with --tasks the lm-eval tasks as `rsq lm-eval` runs them.",
    )
    e.add_argument("model", nargs="?", default=None, help="model or checkpoint (default: embedded SmolLM2)")
    add_ppl_options(e, "--seqlen")
    e.set_defaults(ppl=None)  # wikitext2, unless --tasks is given (see cmd_eval)
    e.add_argument("--device", default=None, help="auto, cpu, cuda (default: auto)")
    e.add_argument(
        "--data-dir", default=None, help="directory with wiki.test.raw and/or the c4 shards; also $RSQ_DATA_DIR"
    )
    e.add_argument("--json-out", default=None, help="also write the results to this JSON file")
    add_lm_eval_options(e, tasks_required=False)
    e.set_defaults(func=cmd_eval)

    from rsq.cli.ablatecmd import add_ablate_parsers
    from rsq.cli.demo import add_demo_parser
    from rsq.cli.evalcmds import add_eval_parsers
    from rsq.cli.exportcmd import add_export_parser
    from rsq.cli.generatecmd import add_generate_parser
    from rsq.cli.inspectcmd import add_inspect_parser
    from rsq.cli.pushcmd import add_push_parser

    add_demo_parser(sub)
    add_inspect_parser(sub)
    add_push_parser(sub)
    add_ablate_parsers(sub)
    add_eval_parsers(sub)
    add_export_parser(sub)
    add_generate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _quiet_transformers()
    previous = _install_sigterm()
    _INTERRUPT_HINT.clear()
    try:
        return args.func(args)
    except RSQError as exc:
        print(f"rsq: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signame = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
        print(f"rsq: interrupted by {signame}; {_resume_hint()}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds (and cleans up) as for Ctrl-C."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _install_sigterm():
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm)


_INTERRUPT_HINT: dict = {}  # set by the command: "out" -> the quantize output directory


def _resume_hint() -> str:
    from rsq.run import STATE_FILE, partial_dir

    out = _INTERRUPT_HINT.get("out")
    if out is None:
        return "nothing was written"
    state = partial_dir(out) / STATE_FILE
    try:
        done = json.loads(state.read_text())["finished_layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no layer was finished, nothing was kept (no {partial_dir(out)}/)"
    return f"{done} finished layers kept in {partial_dir(out)}/: rerun the same command with --resume to continue"


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _quiet_transformers() -> None:
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
