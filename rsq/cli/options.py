"""Options shared by several `rsq` commands (quantize, ablate, demo, eval), the Namespace -> RSQConfig
translation, and the summary table the quantizing commands print.

Defaults are not repeated here: an option left unset keeps the config dataclass's default
(rsq/config.py), and --help shows that default.
"""

from __future__ import annotations

import argparse
import dataclasses

from rsq.config import (
    DEFAULT_METHOD,
    DTYPES,
    EVAL_SEQLEN,
    EVAL_WINDOWS,
    HESSIAN_MATMULS,
    KERNELS,
    METHODS,
    ONLINE_SETTINGS,
    UNROTATED_WEIGHTS,
    CalibConfig,
    GridConfig,
    ImportanceConfig,
    RotationConfig,
    RSQConfig,
    SolverConfig,
)
from rsq.errors import ConfigError
from rsq.recipe import config_from_recipe, read_recipe


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


def pad_width_arg(text: str) -> int | str:
    """--pad-mlp's value: a width (an integer), else the text as given ("auto"; RotationConfig
    refuses anything else in one line)."""
    try:
        return int(text)
    except ValueError:
        return text.strip().lower()


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
        choices=list(METHODS),
        help="fp16: no quantization; rtn: round to nearest; gptq; quarot: rotate + gptq; "
        f"rsq: rotate + attention-concentration scaling + gptq (default: {DEFAULT_METHOD}, or the --config recipe's)",
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
    _opt(
        p,
        "--hessian-matmul",
        SolverConfig,
        "hessian_matmul",
        "how the Hessian's products run for bf16/fp16 activations (float32 sums always): split = "
        "tensor-core products with the token weights exact to ~2^-16 (two products), single = one "
        "product of the sqrt(weight)-scaled inputs rounded to bf16 (2^-8; -16 %% Hessian time on an H100, "
        "+1.6 %% perplexity at 3 bits on SmolLM2 over 3 seeds), fp16 = single's one product with the "
        "features rounded to fp16 instead (2^-11, 8x finer than single; split's perplexity on SmolLM2 over "
        "3 seeds, -15 %% of an 8B run on an H100), fp32 = upcast first; auto = fp16 on CUDA, fp32 elsewhere",
        choices=list(HESSIAN_MATMULS),
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
        "block-diagonal Hadamard that compressed-tensors/vLLM reproduce, see --export-block; no cross-head) or "
        "none (only rotations folded into the weights: the original architecture, any engine runs it)",
        choices=ONLINE_SETTINGS,
    )
    _opt(
        p,
        "--export-block",
        RotationConfig,
        "export_block",
        "--online-rotations export: the block of the down_proj Hadamard, 0 = the largest power of two dividing "
        "the MLP width (Sylvester: vLLM's Hadacore kernel), else any Hadamard order that divides it (e.g. 1792 "
        "or 8960 for a width of 8960; exported as a stored matrix that vLLM applies as a dense GEMM per block)",
        type=int,
    )
    _opt(
        p,
        "--pad-mlp",
        RotationConfig,
        "pad_mlp",
        "zero-pad every layer's MLP to this width before the rotation (function-preserving; the MLP weights grow "
        "by WIDTH/original - 1) so that --online-rotations export gets a larger power-of-two down_proj block, "
        "e.g. 8960 -> 9216 (9 x 1024); auto = under export with the automatic block, a width whose power-of-two "
        "block is below 1024 goes to the next multiple of 1024 where that adds at most 1/16 (Qwen2.5: 4864, 8960, "
        "11008, 13824, 18944, 29568; SmolLM2's 1536 and Llama's 14336 stay), nothing elsewhere; 0 = off",
        type=pad_width_arg,
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
    _opt(
        p,
        "--importance-cap",
        ImportanceConfig,
        "cap",
        "cap each token's weight at K x its sequence's median weight, then renormalise to mean 1 "
        "(scored strategies such as attncon; 0 = off)",
        type=float,
    )
    _opt(
        p,
        "--unrotated-weights",
        ImportanceConfig,
        "unrotated",
        "token weights of a down_proj whose input no online rotation reaches (--online-rotations none, a "
        f"width without a Hadamard): {', '.join(UNROTATED_WEIGHTS)}; weighted: the strategy's weights, uniform: "
        "none, auto: uniform for quarot/rsq with rotation under --online-rotations none at 3 bits or more, "
        "weighted elsewhere (rsq without rotation keeps the paper's weighting); results.json records the choice",
    )
    _opt(
        p,
        "--unrotated-outliers",
        ImportanceConfig,
        "unrotated_outliers",
        "a down_proj whose input no online rotation reaches: off (quantize it), keep-float (keep it unquantized in "
        "the model dtype when its input's channel peak is over --outlier-ratio x the median channel's), "
        "keep-float-on-loss (quantize it and keep it in float when its GPTQ loss is over --outlier-loss-ratio x its "
        "layer's other linears'), auto (keep-float-on-loss for quarot/rsq with rotation under --online-rotations "
        "none, off elsewhere); kept modules export to rsq and compressed-tensors, not gptq",
    )
    _opt(
        p,
        "--outlier-ratio",
        ImportanceConfig,
        "outlier_ratio",
        "--unrotated-outliers keep-float: the channel-peak ratio above which a down_proj is kept",
        type=float,
    )
    _opt(
        p,
        "--outlier-loss-ratio",
        ImportanceConfig,
        "outlier_loss_ratio",
        "--unrotated-outliers keep-float-on-loss: a down_proj whose relative GPTQ loss is over this multiple of "
        "the largest relative loss of its layer's other linears is kept in float",
        type=float,
    )
    _opt(p, "--expand", ImportanceConfig, "expand", "dataset expansion factor F (cyclic rolls, spec §5)", type=int)
    top = {f.name: f.default for f in dataclasses.fields(RSQConfig)}
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help=f"seed of calibration sampling and every random choice (default: {top['seed']})",
    )
    p.add_argument("--device", default=None, help=f"auto, cpu, cuda or cuda:N (default: {top['device']})")
    p.add_argument("--dtype", default=None, help=f"model dtype: float32, bfloat16, float16 (default: {top['dtype']})")
    p.add_argument(
        "--batch-size", type=int, default=None, help=f"calibration sequences per forward (default: {top['batch_size']})"
    )
    p.add_argument(
        "--kernels",
        default=None,
        choices=KERNELS,
        help="auto: Triton kernels on CUDA where they apply; reference: the torch code everywhere "
        f"(default: {top['kernels']})",
    )
    p.add_argument(
        "--offload",
        default=None,
        help=f"calibration activations: auto, device, cpu or disk (default: {top['offload']})",
    )
    p.add_argument(
        "--save-dtype",
        default=None,
        choices=["auto", *DTYPES],
        help="dtype of the checkpoint's unquantized tensors (embeddings, lm_head, norms); auto = the "
        "source's own 16-bit dtype for a float32 run (config.json's dtype; float16 for GGUF sources, "
        "whose blocks hold float16 values), else --dtype. A 16-bit choice halves them; the checkpoint "
        "then differs from the in-memory model (whose perplexity results.json reports) by that "
        f"rounding; quantization scales keep --dtype (default: {top['save_dtype']})",
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


def ppl_sources(text: str) -> tuple[str, ...]:
    return () if text.strip().lower() == "none" else tuple(s.strip() for s in text.split(",") if s.strip())


def max_windows(args: argparse.Namespace) -> int | None:
    """--max-windows: 0 means all (None); a negative count is an error."""
    if args.max_windows < 0:
        raise ConfigError(f"--max-windows {args.max_windows} is invalid: use a positive count, or 0 for all windows")
    return args.max_windows or None


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
