"""`rsq lm-eval`, `rsq longctx` and `rsq report`: evaluation subcommands (argparse wiring and output).

`rsq eval MODEL --tasks ...` reuses the lm-eval options and :func:`cmd_lm_eval` (see
:func:`add_lm_eval_options`)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from rsq import jsonsafe
from rsq.cli.cmd_generate import add_packed_option
from rsq.cli.options import add_ppl_options, max_windows, ppl_sources
from rsq.cli.progress import Progress
from rsq.config import DTYPES, TORCH_DTYPES
from rsq.errors import ConfigError
from rsq.eval import longctx
from rsq.eval.longctx import parse_positions, run_examples, run_longctx
from rsq.eval.runner import PerplexityOptions, run_eval
from rsq.eval.zeroshot import run_lm_eval
from rsq.io.hf import load_any
from rsq.io.loading import describe_source
from rsq.models.device import resolve_device
from rsq.plan.preflight import check_file_target, check_lengths
from rsq.report.compare import write_report
from rsq.report.plotting import require_matplotlib


def _csv(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in _csv(text)]
    except ValueError as exc:
        raise ConfigError(f"{flag} takes comma-separated integers, got {text!r}") from exc


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}"


def _load(model: str | None, dtype: str | None, dense: bool = False, packed: bool = False):
    """(model, tokenizer) via rsq's loader; ``dtype`` casts the floating-point weights afterwards;
    ``dense`` replaces the packed linears by dense ones (:func:`rsq.checkpoint.dense.dequantize_once`)."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    net, tok = load_any(model, packed=packed)
    if dtype is not None:
        net.to(TORCH_DTYPES[dtype])
    if dense:
        from rsq.checkpoint.dense import dequantize_once  # nn.Linear for packed ones: loads the kernels

        dequantize_once(net, keep_packed=False)
    return net, tok


def add_parsers(sub) -> None:
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

    model_help = "model or checkpoint: hub id, directory, .gguf or rsq run directory (default: embedded SmolLM2)"

    z = sub.add_parser(
        "lm-eval",
        help="zero-/few-shot accuracy with lm-evaluation-harness",
        description="Run lm-eval tasks on MODEL_OR_DIR loaded by rsq (quantized checkpoints "
        "included). Reported metric per task: acc_norm, else acc, else exact_match "
        "(flexible-extract); the average is the plain mean over top-level entries. "
        "`rsq eval MODEL --tasks ...` does the same.",
    )
    z.add_argument("model", nargs="?", default=None, help=model_help)
    add_lm_eval_options(z, tasks_required=True)
    z.set_defaults(func=cmd_lm_eval)

    lc = sub.add_parser(
        "longctx",
        help="long-context retrieval accuracy by length and gold position",
        description="Synthetic LongEval 'lines' and Lost-in-the-Middle key-value retrieval, "
        "greedy decoding, accuracy by length and position. Prompts longer than the model's "
        "context are skipped and listed.",
    )
    lc.add_argument("model", nargs="?", default=None, help=model_help)
    lc.add_argument(
        "--task", default="lines", help="lines, kv, lines,kv or none (only benchmark files) (default: lines)"
    )
    lc.add_argument(
        "--lines",
        default=None,
        help="comma-separated item counts (lines, or key-value pairs for kv) "
        "(default: 300,460,620 as the paper when --tokens is not given)",
    )
    lc.add_argument(
        "--tokens",
        default=None,
        help="comma-separated prompt token budgets, or 'max' for the model's context; each becomes "
        "the largest item count that fits",
    )
    lc.add_argument(
        "--positions",
        default="start,middle,end",
        help="gold positions: start, middle, end or fractions in [0,1] (default: start,middle,end)",
    )
    lc.add_argument("--samples", type=int, default=5, help="prompts per length and position (default: 5)")
    lc.add_argument("--seed", type=int, default=0, help="seed of the generated keys and values (default: 0)")
    lc.add_argument("--max-new-tokens", type=int, default=None, help="answer tokens (default: lines 24, kv 48)")
    lc.add_argument("--no-chat", action="store_true", help="raw prompt even when the tokenizer has a chat template")
    lc.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    lc.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="static KV cache + compiled decode step, one cache size for the whole run (default: on for CUDA, "
        "off on the CPU; --no-compile: eager decoding)",
    )
    lc.add_argument(
        "--dtype",
        default=None,
        help="cast weights after loading: float16, bfloat16, float32 (default: as loaded, float32)",
    )

    add_packed_option(lc)
    lc.add_argument(
        "--dense",
        action="store_true",
        help="dequantize packed weights once after loading (same function; much faster greedy "
        "decoding on CPU, where every step otherwise dequantizes every layer; more memory)",
    )
    lc.add_argument(
        "--leval",
        action="append",
        metavar="FILE",
        help="an L-Eval task jsonl (fields input, instructions, outputs); repeatable",
    )
    lc.add_argument(
        "--lca",
        action="append",
        metavar="FILE",
        help="a Long Code Arena library-based code generation jsonl (instruction, clean_reference, "
        "unique_apis); repeatable",
    )
    lc.add_argument(
        "--icl",
        action="append",
        nargs=2,
        metavar=("TRAIN", "TEST"),
        help="LongICLBench-style train and test jsonl of {text, label}; repeatable",
    )
    lc.add_argument("--icl-rounds", type=int, default=1, help="demonstration rounds for --icl (default: 1)")
    lc.add_argument("--icl-label-names", default=None, help="JSON list of class names for integer --icl labels")
    lc.add_argument("--bench-limit", type=int, default=None, help="at most this many examples per benchmark file")
    lc.add_argument("--bench-new-tokens", type=int, default=64, help="answer tokens for benchmark files (default: 64)")
    lc.add_argument(
        "--json-out", default=None, help="write the results here (e.g. RUN_DIR/longctx.json for rsq report)"
    )
    lc.set_defaults(func=cmd_longctx)

    r = sub.add_parser(
        "report",
        help="markdown/HTML report with plots comparing run directories",
        description="Read RUN_DIR/results.json and the evaluation JSONs in each RUN_DIR "
        "(lm_eval/longctx/eval --json-out) and write report.md, report.html and PNG plots.",
    )
    r.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (rsq quantize --out ...)")
    r.add_argument("--out", required=True, help="report directory")
    r.add_argument("--title", default="rsq comparison", help="report title (default: rsq comparison)")
    r.set_defaults(func=cmd_report)


TASKS_HELP = (
    "comma-separated lm-eval task names, e.g. piqa,hellaswag,arc_easy,arc_challenge,winogrande,lambada "
    "(hub data), or rsq_facts (a small local task shipped with rsq)"
)


def add_lm_eval_options(p, tasks_required: bool) -> None:
    """The lm-eval options, shared by `rsq lm-eval` and `rsq eval` (where --tasks is optional)."""
    add_packed_option(p)
    if tasks_required:
        p.add_argument("--tasks", required=True, help=TASKS_HELP)
    else:
        p.add_argument(
            "--tasks",
            default=None,
            help=TASKS_HELP + "; runs them as `rsq lm-eval` does, and perplexity then only when --ppl is given",
        )
    p.add_argument(
        "--limit",
        type=float,
        default=None,
        help="documents per task (>=1) or a fraction (<1); for quick checks only (default: all)",
    )
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's, 0 for most)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="lm-eval task sequences per forward (perplexity: --ppl-batch-size) (default: 8)",
    )
    p.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAMLs")
    p.add_argument(
        "--chat-template",
        action="store_true",
        help="apply the tokenizer's chat template (few-shot as multi-turn), as for gsm8k_cot_llama",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of few-shot sampling (default: 0)")
    if tasks_required:  # `rsq eval` has its own --device and --json-out
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--dtype",
        default=None,
        help="cast weights after loading: float16, bfloat16, float32 (default: as loaded, float32)",
    )
    if tasks_required:
        p.add_argument(
            "--json-out", default=None, help="write the results here (e.g. RUN_DIR/lm_eval.json for rsq report)"
        )


def _write_json(path: str | None, data: dict) -> None:
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(jsonsafe.dumps(data, indent=2))
        print(f"wrote {p}")


def cmd_lm_eval(args, loaded=None) -> int:
    """``loaded``: an already loaded (model, tokenizer) (``rsq eval --tasks --ppl`` loads once)."""
    tasks = _csv(args.tasks)
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    model, tokenizer = (
        loaded if loaded is not None else _load(args.model, args.dtype, packed=getattr(args, "packed", False))
    )
    res = run_lm_eval(
        model,
        tokenizer,
        tasks,
        batch_size=args.batch_size,
        limit=limit,
        num_fewshot=args.num_fewshot,
        include_path=args.include_path,
        device=args.device or "auto",
        apply_chat_template=args.chat_template,
        seed=args.seed,
    )
    res["model"] = describe_source(args.model)
    print(f"{'task':<28} {'metric':<32} {'value':>7} {'stderr':>7}")
    for name, t in res["tasks"].items():
        mark = "*" if name in res["averaged"] else " "
        value = "–" if t["value"] is None else f"{100 * t['value']:.2f}"
        stderr = "–" if t["stderr"] is None else f"{100 * t['stderr']:.2f}"
        print(f"{mark}{name:<27} {str(t['metric']):<32} {value:>7} {stderr:>7}")
    avg = res["average"]
    print(f"average of * entries ({len(res['averaged'])}): " + ("–" if math.isnan(avg) else f"{100 * avg:.2f}"))
    if limit is not None:
        print(f"note: --limit {limit}: not comparable to full-task scores")
    _write_json(args.json_out, res)
    return 0


def _benchmarks(args) -> dict[str, list]:
    """Load the benchmark files named on the command line (before the model: missing data fails fast)."""
    out: dict[str, list] = {}
    limit = args.bench_limit
    for path in args.leval or []:
        out[f"leval:{Path(path).stem}"] = longctx.load_leval(path, limit=limit)
    for path in args.lca or []:
        out[f"lca:{Path(path).stem}"] = longctx.load_lca_library(path, limit=limit)
    names = None
    if args.icl_label_names:
        try:
            names = json.loads(Path(args.icl_label_names).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--icl-label-names {args.icl_label_names}: not a readable JSON list ({exc})") from exc
    for train, test in args.icl or []:
        out[f"icl:{Path(test).stem}:r{args.icl_rounds}"] = longctx.load_longiclbench(
            train, test, rounds=args.icl_rounds, label_names=names, limit=limit
        )
    return out


def cmd_longctx(args) -> int:
    tasks = [] if args.task.strip().lower() == "none" else _csv(args.task)
    positions = parse_positions(args.positions)
    tokens = [t if t == "max" else int(t) for t in _csv(args.tokens)] if args.tokens else []
    if any(t != "max" and t < 1 for t in tokens):
        raise ConfigError(f"--tokens takes positive integers or 'max', got {args.tokens!r}")
    items = _ints(args.lines, "--lines") if args.lines else ([] if tokens else [300, 460, 620])
    benches = _benchmarks(args)
    if not tasks and not benches:
        raise ConfigError("--task none and no --leval/--lca/--icl data: nothing to evaluate")
    model, tokenizer = _load(args.model, args.dtype, dense=args.dense, packed=getattr(args, "packed", False))
    chat = False if args.no_chat else "auto"
    with Progress() as progress:
        res = run_longctx(
            model,
            tokenizer,
            tasks,
            device=args.device,
            items=items,
            tokens=tokens,
            positions=positions,
            samples=args.samples,
            seed=args.seed,
            max_new_tokens=args.max_new_tokens,
            chat=chat,
            progress=progress.update,
            compile=args.compile,
        )
        if benches:
            res["benchmarks"] = {
                name: {
                    "metric": examples[0].metric,
                    **run_examples(
                        model,
                        tokenizer,
                        examples,
                        max_new_tokens=args.bench_new_tokens,
                        chat=chat,
                        compile=args.compile,
                        progress=progress.update,
                    ),
                }
                for name, examples in benches.items()
            }
    res["model"] = describe_source(args.model)
    for task, r in res["tasks"].items():
        print(f"{task}: {r['decoding']}; {r['scoring']}")
        print(f"  {'items':>6} {'tokens':>7} {'n':>4} " + " ".join(f"{p:>7}" for p in r["positions"]) + f" {'all':>7}")
        for length in r["lengths"]:
            cells = " ".join(f"{_pct(length['by_position'][p]):>7}" for p in r["positions"])
            print(
                f"  {length['items']:>6} {length['tokens']:>7.0f} {length['n']:>4} "
                f"{cells} {_pct(length['accuracy']):>7}"
            )
        if r["skipped"]:
            sizes = sorted({s["items"] for s in r["skipped"]})
            print(f"  skipped (longer than the context {r['model_context']}): items {', '.join(map(str, sizes))}")
        print(f"  {r['seconds']:.0f} s")
    for name, b in res.get("benchmarks", {}).items():
        print(
            f"{name}: {b['metric']} {_pct(b['score'])} over {b['n']} examples"
            + (f" ({len(b['skipped'])} skipped: longer than the context)" if b["skipped"] else "")
        )
    _write_json(args.json_out, res)
    return 0


def cmd_report(args) -> int:
    require_matplotlib()  # before any work: the plots are part of the output

    summary = write_report(args.runs, args.out, title=args.title)
    out = Path(args.out)
    print(f"wrote {out / 'report.md'}, {out / 'report.html'}" + "".join(f", {out / p}" for p in summary["plots"]))
    return 0


def cmd_eval(args) -> int:
    """Perplexity; with --tasks the lm-eval tasks instead (as `rsq lm-eval`), plus perplexity when --ppl is given."""
    ppl = args.ppl if args.ppl is not None else ("none" if args.tasks else "wikitext2")
    if ppl_sources(ppl):
        check_lengths(
            ppl_seqlen=args.ppl_seqlen,
            ppl_max_windows=max_windows(args),
            ppl_batch_size=args.ppl_batch_size,
            seqlen_flag="--seqlen",
        )
    resolve_device(args.device or "auto")
    if args.json_out:
        check_file_target(Path(args.json_out), "--json-out")
    if args.tasks and ppl_sources(ppl) and args.json_out:
        raise ConfigError(
            "--json-out with both --tasks and --ppl: run rsq eval once per kind (each writes its own "
            "JSON for rsq report)"
        )
    loaded = None
    if args.tasks and ppl_sources(ppl):  # one load for both (with --dtype applied, as lm-eval sees it)
        loaded = _load(args.model, args.dtype, packed=getattr(args, "packed", False))
    if ppl_sources(ppl):
        with Progress() as progress:
            windows = PerplexityOptions(
                seqlen=args.ppl_seqlen,
                max_windows=max_windows(args),
                batch_size=args.ppl_batch_size,
                force_seqlen=args.force_seqlen,
                data_dir=args.data_dir,
            )
            results = run_eval(
                args.model,
                ppl_sources(ppl),
                windows,
                device=args.device or "auto",
                progress=progress.update,
                loaded=loaded,
            )
        print(jsonsafe.dumps(results["perplexity"], indent=2))
        if args.json_out:
            Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json_out).write_text(jsonsafe.dumps(results, indent=2))
            print(f"wrote {args.json_out}")
    if args.tasks:
        return cmd_lm_eval(args, loaded)
    return 0
