"""The one home of rsq's defaults: a frozen, versioned config tree.

Every default of the method lives here (spec §1). The CLI builds an :class:`RSQConfig` from its
options, the pipeline reads it, and the checkpoint stores ``to_dict()`` of it, so a run can be
reproduced from its output directory alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch

from rsq.errors import ConfigError

CONFIG_VERSION = 1

METHODS = ("fp16", "rtn", "gptq", "quarot", "rsq")
# the method of `rsq quantize` without --method and of a recipe without `method:`. The plain
# RSQConfig(...) constructor's field defaults describe gptq (no rotation, uniform importance) and
# stay so: RSQConfig.for_method(DEFAULT_METHOD) is the default job.
DEFAULT_METHOD = "rsq"
TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
DTYPES = tuple(TORCH_DTYPES)
KERNELS = ("auto", "reference")
ONLINE_SETTINGS = ("exact", "export", "none")
# token weights of a down_proj whose input is not rotated; "auto" is resolved by resolve_unrotated()
UNROTATED_WEIGHTS = ("auto", "weighted", "uniform")
# --unrotated-weights auto is "uniform" from this many bits up (issue 33: SmolLM2 under `none`, 3 seeds,
# H200: uniform beats weighted and quarot at 3 and 4 bits, loses to both at 2 bits in 3 of 3 seeds)
AUTO_UNIFORM_MIN_BITS = 3
# what happens to a down_proj whose input is not rotated and carries a massive activation (issue 33)
UNROTATED_OUTLIERS = ("auto", "off", "keep-float", "keep-float-on-loss")
# the evaluation protocol's defaults (spec: perplexity on non-overlapping windows of the held-out text)
EVAL_SEQLEN = 512  # tokens per perplexity window
EVAL_WINDOWS = 40  # at most this many windows (0 = all)


@dataclass(frozen=True)
class GridConfig:
    """The number format of one weight matrix.

    kind: the number format, a name registered in rsq/formats/ (uniform, nf, e8p).
    bits: what the format stores: 2, 3, 4 or 8 for the scalar grids; 2 for e8p (8 weights per 16-bit code).
    group_size: -1 for one scale per output channel, else columns per group (must divide in_features).
    symmetric: levels {-2^(b-1) .. 2^(b-1)-1} with scale = clip*max|w|/(2^(b-1)-1); asymmetric uses
        min/max with an integer zero point.
    mse_clip: per-row search over shrink factors p = 1, 1-1/clip_grid, ... (clip_grid*max_shrink
        candidates) minimising sum |q(w)-w|^clip_norm (spec §1: 100, 0.8, 2.4).
    """

    kind: str = "uniform"
    bits: int = 3
    group_size: int = -1
    symmetric: bool = True
    mse_clip: bool = True
    clip_grid: int = 100
    max_shrink: float = 0.8
    clip_norm: float = 2.4
    e8p_scale: float = 0.9  # sigma = RMS(W) / e8p_scale (spec §6)

    def __post_init__(self) -> None:
        self.format.validate(self)  # the format registry knows the names and the widths each stores
        if self.group_size == 0 or self.group_size < -1:
            raise ConfigError(f"--group-size {self.group_size} is invalid: use -1 (per channel) or a positive size")
        if not 0 < self.max_shrink < 1:
            raise ConfigError(f"max_shrink {self.max_shrink} must be in (0, 1)")
        if self.clip_grid < 1:
            raise ConfigError("clip_grid must be >= 1")

    @property
    def format(self):
        """The registered number format of this grid (rsq/formats/): ConfigError for unknown names."""
        from rsq.formats import get_format

        return get_format(self.kind)

    def check_width(self, in_features: int, name: str = "") -> None:
        """Raise if the group size does not divide a layer's input width."""
        if self.group_size > 0 and in_features % self.group_size:
            where = f" of {name}" if name else ""
            raise ConfigError(
                f"--group-size {self.group_size} does not divide the input width {in_features}{where}: "
                f"choose a divisor of {in_features} or -1 (per channel)"
            )


HESSIAN_MATMULS = ("auto", "split", "single", "fp16", "fp32")  # SolverConfig.hessian_matmul


@dataclass(frozen=True)
class SolverConfig:
    """GPTQ solve (spec §4): block 128, damp 1% of mean diag(H), natural column order."""

    # rtn, or the solver of the grid's format (gptq for uniform/nf, ldlq for e8p): for_method picks it
    algorithm: str = "gptq"
    block_size: int = 128
    inner_block: int = 16  # GPTQ columns per sub-block inside a block (rsq/solver/gptq.py::_gptq_block)
    damp_frac: float = 0.01
    act_order: bool = False
    damp_retries: int = 10  # bounded: raise SingularHessianError after this many extra dampings
    ldlq_tune_iters: int = 10
    hessian_dtype: str = "float32"  # accumulation precision: float32 (spec) or float64
    # How H = X^T (w ⊙ X) is multiplied when the activations X are bf16/fp16 (float32 sums always):
    # split: half products on the tensor cores, w ⊙ X as hi + lo half parts (two products, the
    #   weighting exact to ~2^-16); single: one product, the Gram matrix of half(sqrt(w) ⊙ X) (each
    #   weighted feature rounded once more, 2^-8 for bf16: the size of the rounding bf16 activations
    #   already carry; still symmetric PSD); fp16: single's one product, the features rounded to fp16
    #   instead (2^-11, each batch scaled by a power of two into fp16's range); fp32: upcast first;
    # auto: fp16 on CUDA (rsq.solver.hessian.hessian_arithmetic), fp32 elsewhere. split/single/fp16
    #   named explicitly also run off CUDA, as float32 matmuls of the same half factors (the GPU's
    #   arithmetic, for checking it on a CPU).
    hessian_matmul: str = "auto"
    cuda_graphs: bool = True  # replay each GPTQ block as a captured CUDA graph on GPUs

    def __post_init__(self) -> None:
        if self.algorithm not in ("gptq", "rtn", "ldlq"):
            raise ConfigError(f"unknown solver {self.algorithm!r}: use gptq, rtn or ldlq (the e8p grid's)")
        if self.block_size < 1:
            raise ConfigError("block_size must be >= 1")
        if self.inner_block < 1:
            raise ConfigError("inner_block must be >= 1")
        if not 0 <= self.damp_frac < 1:
            raise ConfigError(f"damp_frac {self.damp_frac} must be in [0, 1)")
        if self.damp_retries < 0:
            raise ConfigError("damp_retries must be >= 0")
        if self.hessian_matmul not in HESSIAN_MATMULS:
            raise ConfigError(f"hessian_matmul {self.hessian_matmul!r}: use one of {', '.join(HESSIAN_MATMULS)}")
        if self.hessian_dtype not in ("float32", "float64"):
            raise ConfigError(f"hessian_dtype {self.hessian_dtype!r}: use float32 or float64")


@dataclass(frozen=True)
class RotationConfig:
    """QuaRot-style function-preserving rotation (spec §2)."""

    enabled: bool = False
    seed: int = 0
    mode: str = "hadamard"  # hadamard | random (random orthogonal, QR of a Gaussian)
    online_down: bool = True  # exact Hadamard on the down_proj input
    online_value: bool = True  # per-head Hadamard in v_proj + cross-head part before o_proj
    center_embeddings: bool = False  # reference-code quirk (not function-preserving for RMSNorm)
    fallback: str = "skip"  # where no Hadamard of an order exists: skip | random
    # run-time rotations: exact (down_proj Hadamard + cross-head before o_proj), export (down_proj as
    # a block-diagonal Hadamard a compressed-tensors transform reproduces, no cross-head; export_block)
    # or none (only rotations that fold into the weights: the original architecture)
    online: str = "export"
    # export: the block of the down_proj Hadamard; 0 = the largest power of two dividing the width
    # (compressed-tensors' Sylvester ``hadamard`` transform), else any Hadamard order rsq builds that
    # divides the width (e.g. 1792 = 28 x 64 or the whole 8960 of Qwen2.5-1.5B; exported as a stored
    # matrix that vLLM applies as a dense GEMM per block: rsq/checkpoint/export.py)
    export_block: int = 0
    # zero-pad every layer's MLP to this width before rotating it (rsq/rotation/pad.py): 0 = off,
    # "auto" (default) = under export with the automatic block, a width whose power-of-two block is
    # below 1024 goes to the next multiple of 1024 if that adds at most 1/16 (8960 -> 9216 = 9 x 1024;
    # 1536 and 14336 stay); function-preserving; export's power-of-two down_proj block grows for
    # WIDTH/original - 1 more MLP weights; config.intermediate_size becomes WIDTH
    pad_mlp: int | str = "auto"

    @property
    def auto_pad_applies(self) -> bool:
        """Whether ``pad_mlp="auto"`` may pad (rsq/rotation/pad.py auto_width decides from the width): a
        rotation under export with the automatic block. exact rotates the whole width; none has no
        down_proj rotation; an explicit export_block is the user's choice of block."""
        return self.enabled and self.online == "export" and not self.export_block

    @property
    def explicit_pad(self) -> int:
        """The width an explicit ``--pad-mlp WIDTH`` asks for; 0 for off and for "auto" (which never
        asks for anything it cannot do, so the refusals below are for explicit widths only)."""
        return 0 if self.pad_mlp == "auto" else self.pad_mlp

    def __post_init__(self) -> None:
        pad = self.pad_mlp
        if not (pad == "auto" or (isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0)):
            raise ConfigError(f"--pad-mlp {pad!r} must be 0 (off), auto or an MLP width")
        if self.explicit_pad and self.online == "none":
            raise ConfigError(
                f"--pad-mlp {pad} only serves the down_proj Hadamard of --online-rotations export or exact; "
                "under none it would add zero weights and nothing else: drop --pad-mlp"
            )
        if self.export_block < 0:
            raise ConfigError(f"--export-block {self.export_block} must be 0 (auto) or a block size > 0")
        if self.online not in ONLINE_SETTINGS:
            raise ConfigError(f"unknown --online-rotations {self.online!r}: use {', '.join(ONLINE_SETTINGS)}")
        if self.mode not in ("hadamard", "random"):
            raise ConfigError(f"unknown rotation mode {self.mode!r}: use hadamard or random")
        if self.fallback not in ("skip", "random"):
            raise ConfigError(f"unknown rotation fallback {self.fallback!r}: use skip or random")


@dataclass(frozen=True)
class ImportanceConfig:
    """Per-token importance ('Scale', spec §3). ``uniform`` is plain GPTQ."""

    strategy: str = "uniform"
    r_min: float = 0.005
    r_max: float = 1.0
    normalize: str = "none"  # none | linear | sqrt : divide attncon by (#queries seeing token)^p
    power: float = 1.0  # s <- s ** power before min-max
    quantile: float = 0.0  # 0 = plain min/max; q > 0 uses the q and 1-q quantiles
    expand: int = 1  # dataset expansion factor F by cyclic rolls (spec §5)
    query_chunk: int = 512  # attncon: queries per chunk (memory O(chunk * T) per head)
    # robust weighting (issue 33): cap = K > 0 caps each token's weight at K x its sequence's median
    # weight, then renormalises to mean 1 (scored strategies; 0 = off). unrotated = "uniform" gives
    # the down_proj uniform weights wherever no online rotation reaches its input (--online-rotations
    # none, a width without a Hadamard, no rotation), "weighted" keeps the strategy's weights there,
    # "auto" (default) is one of the two, chosen from the rest of the config by resolve_unrotated()
    # and recorded resolved (run_quantize records RSQConfig.resolved())
    cap: float = 0.0
    unrotated: str = "auto"
    # massive activations at an unrotated site (issue 33, rsq/importance/sites.py): "keep-float" leaves
    # a down_proj that no online rotation reaches unquantized (model dtype, listed in results.json)
    # when its input's channel_peak (max over channels of max_t |x_tj|, over the median channel's)
    # exceeds outlier_ratio; "off" quantizes every linear
    # "keep-float-on-loss" quantizes such a down_proj and puts its float weights back when its relative
    # GPTQ loss exceeds outlier_loss_ratio x the largest of the same layer's other linears; "auto"
    # (default) is keep-float-on-loss in rotated runs under --online-rotations none, off elsewhere
    # (resolve_unrotated_outliers, recorded resolved)
    unrotated_outliers: str = "auto"
    outlier_ratio: float = 50.0
    outlier_loss_ratio: float = 2.0

    def __post_init__(self) -> None:
        if self.cap != 0 and not self.cap >= 1:
            raise ConfigError(f"--importance-cap {self.cap} must be 0 (off) or >= 1 (a multiple of the median weight)")
        if self.unrotated_outliers not in UNROTATED_OUTLIERS:
            raise ConfigError(
                f"unknown --unrotated-outliers {self.unrotated_outliers!r}: use {' or '.join(UNROTATED_OUTLIERS)}"
            )
        if not self.outlier_loss_ratio > 0:
            raise ConfigError(
                f"--outlier-loss-ratio {self.outlier_loss_ratio} must be > 0 (a multiple of the layer's largest "
                "other relative loss)"
            )
        if not self.outlier_ratio > 1:
            raise ConfigError(
                f"--outlier-ratio {self.outlier_ratio} must be > 1 (a multiple of the median channel peak)"
            )
        if self.unrotated not in UNROTATED_WEIGHTS:
            raise ConfigError(f"unknown --unrotated-weights {self.unrotated!r}: use {' or '.join(UNROTATED_WEIGHTS)}")
        if not 0 <= self.r_min <= self.r_max:
            raise ConfigError(f"need 0 <= r_min <= r_max, got r_min={self.r_min}, r_max={self.r_max}")
        if self.r_max <= 0:
            raise ConfigError("r_max must be > 0")
        if self.normalize not in ("none", "linear", "sqrt"):
            raise ConfigError(f"unknown normalize {self.normalize!r}: use none, linear or sqrt")
        if not 0 <= self.quantile < 0.5:
            raise ConfigError(f"quantile {self.quantile} must be in [0, 0.5)")
        if self.expand < 1:
            raise ConfigError(f"--expand {self.expand} must be >= 1")
        if self.query_chunk < 1:
            raise ConfigError("query_chunk must be >= 1")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration windows: N windows of T tokens at seeded random offsets (spec §1)."""

    source: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 512
    data_dir: str | None = None

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise ConfigError(f"--nsamples {self.nsamples} must be >= 1")
        if self.seqlen < 2:
            raise ConfigError(f"--seqlen {self.seqlen} must be >= 2")


@dataclass(frozen=True)
class RSQConfig:
    """Everything a quantization run needs.

    Build one with :meth:`for_method`, the only place the methods' presets live (rotation,
    importance strategy, solver): ``RSQConfig.for_method("rsq", grid={"bits": 4})``. The plain
    constructor takes every field as given and refuses fields that contradict ``method`` (say
    ``method="rsq"`` with uniform importance, which would run QuaRot and record "rsq"); its
    defaults are a consistent plain-GPTQ run.
    """

    model: str = ""
    method: str = "gptq"
    grid: GridConfig = field(default_factory=GridConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    rotation: RotationConfig = field(default_factory=RotationConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"
    batch_size: int = 8  # calibration sequences per forward pass
    offload: str = "auto"  # where calibration activations live: auto | device | cpu | disk
    save_dtype: str = "auto"  # unquantized tensors in the checkpoint: auto (= dtype) or a dtype name
    # auto: the Triton kernels on CUDA where they apply (clip search, GPTQ sub-blocks, Hessian split,
    # attention column sums); reference: the torch code everywhere (the kernels' oracle)
    kernels: str = "auto"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")
        if self.offload not in ("auto", "device", "cpu", "disk"):
            raise ConfigError(f"unknown offload {self.offload!r}: use auto, device, cpu or disk")
        if self.save_dtype != "auto" and self.save_dtype not in DTYPES:
            raise ConfigError(f"unknown save_dtype {self.save_dtype!r}: use auto or one of {', '.join(DTYPES)}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"unknown kernels {self.kernels!r}: use {' or '.join(KERNELS)}")
        if self.solver.algorithm == "rtn" and self.importance.unrotated_outliers not in ("off", "auto"):
            raise ConfigError(
                f"--unrotated-outliers {self.importance.unrotated_outliers} decides from down_proj input statistics "
                "or GPTQ losses that only a Hessian pass gives, and --method rtn has none: use --unrotated-outliers "
                "off with rtn, "
                "or --method gptq, quarot or rsq"
            )
        if self.rotation.explicit_pad and not self.rotation.enabled:
            raise ConfigError(
                f"--pad-mlp {self.rotation.pad_mlp} pads the MLP of a rotated model (for a larger down_proj Hadamard "
                "block) and this run does not rotate: use --method quarot or rsq (or --rotate), or drop --pad-mlp"
            )
        if self.rotation.explicit_pad and self.quantizes and not self.grid.format.zero_rows_exact:
            raise ConfigError(
                f"--pad-mlp with the {self.grid.kind} grid: an all-zero row does not quantize to zeros there, so the "
                "padded gate/up rows would change the function; use --grid uniform or nf, or drop --pad-mlp"
            )
        problem = _contradiction(self)
        if problem:
            raise ConfigError(
                f"method {self.method!r} contradicts the config: {problem}; build the config with "
                f"RSQConfig.for_method({self.method!r}, ...) (rsq quantize does), "
                "or name the method the fields describe"
            )

    @classmethod
    def for_method(cls, method: str, **overrides: Any) -> RSQConfig:
        """The config of ``method`` with its preset (see :data:`PRESETS`) under ``overrides``.

        overrides: top-level fields (seed, device, dtype, ...) and the sub-configs ``grid``,
        ``solver``, ``rotation``, ``importance``, ``calib``, each either a dict of the fields to set
        (the preset and the dataclass defaults fill the rest) or a finished dataclass (taken as is).
        The preset sets rotation.enabled, importance.strategy and solver.algorithm (rtn, or the
        solver of the grid's format, e.g. ldlq for e8p); grid.bits defaults to the format's default.
        Fields that contradict the method (rotation on for gptq, uniform importance for rsq) are
        refused by the constructor.
        """
        preset = method_preset(method)
        sub: dict[str, Any] = {}
        for name, klass in _SUBCONFIGS.items():
            value = overrides.pop(name, None)
            sub[name] = value if is_dataclass(value) else dict(value or {})
            if isinstance(sub[name], dict):
                known = {f.name for f in fields(klass)}
                for key in sub[name]:
                    if key not in known:
                        raise ConfigError(f"unknown config field {klass.__name__}.{key}: see rsq/config.py")
        grid = sub["grid"]
        if isinstance(grid, dict):
            from rsq.formats import get_format

            grid.setdefault("bits", get_format(grid.get("kind", "uniform")).default_bits)
            sub["grid"] = grid = GridConfig(**grid)
        defaults = {
            "solver": {"algorithm": "rtn" if preset["algorithm"] == "rtn" else grid.format.solver},
            "rotation": {"enabled": preset["rotate"]},
            "importance": {"strategy": preset["importance"]},
            "calib": {},
        }
        for name, fill in defaults.items():
            if isinstance(sub[name], dict):
                sub[name] = _SUBCONFIGS[name](**{**fill, **sub[name]})
        return cls(method=method, **sub, **overrides)

    @property
    def quantizes(self) -> bool:
        return self.method != "fp16"

    def resolved(self) -> RSQConfig:
        """This config with every "auto" choice made (importance.unrotated and
        importance.unrotated_outliers: :func:`resolve_unrotated`, :func:`resolve_unrotated_outliers`;
        rotation.pad_mlp becomes 0 where it cannot pad: :attr:`auto_pad_possible`; where it can, the
        model's width decides, and results.json/the checkpoint record rotation.mlp_padding):
        what a run executes and records."""
        imp = self.importance
        out = self
        if imp.unrotated == "auto" or imp.unrotated_outliers == "auto":
            chosen = replace(
                imp, unrotated=resolve_unrotated(self), unrotated_outliers=resolve_unrotated_outliers(self)
            )
            out = replace(out, importance=chosen)
        if self.rotation.pad_mlp == "auto" and not self.auto_pad_possible:
            out = replace(out, rotation=replace(out.rotation, pad_mlp=0))
        return out

    @property
    def auto_pad_possible(self) -> bool:
        """Whether ``--pad-mlp auto`` may pad this run, before the model's width is known: a quantizing,
        rotated run under export with the automatic block, on a grid whose all-zero rows quantize to
        zeros (rsq/rotation/pad.py decides from the width). Elsewhere "auto" resolves to 0 (recorded)."""
        return self.quantizes and self.rotation.auto_pad_applies and self.grid.format.zero_rows_exact

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RSQConfig:
        version = data.get("version", CONFIG_VERSION)
        if version > CONFIG_VERSION:
            raise ConfigError(f"config version {version} is newer than this rsq ({CONFIG_VERSION}): upgrade rsq")
        return _from_dict(cls, data)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    kwargs = {}
    names = {f.name: f for f in fields(cls)}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown config field {cls.__name__}.{key}")
        sub = _dataclass_type(cls, key)
        kwargs[key] = _from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


_SUBCONFIGS = {
    "grid": GridConfig,
    "solver": SolverConfig,
    "rotation": RotationConfig,
    "importance": ImportanceConfig,
    "calib": CalibConfig,
}


def _dataclass_type(cls: type, key: str) -> type | None:
    if cls is RSQConfig and key in _SUBCONFIGS:
        return _SUBCONFIGS[key]
    return None


# What a --method means: rotation on/off, importance strategy and solver ("solve" = the solver of
# the grid's format). The only home of the presets: RSQConfig.for_method applies them.
PRESETS: dict[str, dict[str, Any]] = {
    "fp16": dict(rotate=False, importance="uniform", algorithm="solve"),
    "rtn": dict(rotate=False, importance="uniform", algorithm="rtn"),
    "gptq": dict(rotate=False, importance="uniform", algorithm="solve"),
    "quarot": dict(rotate=True, importance="uniform", algorithm="solve"),
    "rsq": dict(rotate=True, importance="attncon", algorithm="solve"),
}


def method_preset(method: str) -> dict[str, Any]:
    """The preset of ``method`` (a copy of its :data:`PRESETS` entry)."""
    if method not in PRESETS:
        raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    return dict(PRESETS[method])


def resolve_unrotated(cfg: RSQConfig) -> str:
    """What ``--unrotated-weights`` means for ``cfg``: its value, or for "auto" "uniform" in a rotated
    run (quarot, rsq with rotation on) under ``--online-rotations none`` at >= AUTO_UNIFORM_MIN_BITS
    bits, "weighted" everywhere else.

    Why (issue 33, bench/NOTES-importance.md sessions 12-13): under ``none`` no rotation reaches the
    down_proj input, and attncon's heaviest tokens (the attention sinks) carry its massive activations;
    weighting them made rsq worse than quarot at 3 and 4 bits (SmolLM2, 3 seeds; Qwen2.5-Coder-1.5B,
    one seed), uniform down_proj weights put it ahead. Not at 2 bits (worse in 3 of 3 seeds), and not
    without rotation: rsq without rotation is the paper's "scale without rotate" ablation, whose
    weighting must stay as published. exact/export rotate that input online: "weighted" there.
    """
    imp = cfg.importance
    if imp.unrotated != "auto":
        return imp.unrotated
    rotated = cfg.method in ("quarot", "rsq") and cfg.rotation.enabled
    if rotated and cfg.rotation.online == "none" and cfg.grid.bits >= AUTO_UNIFORM_MIN_BITS:
        return "uniform"
    return "weighted"


def resolve_unrotated_outliers(cfg: RSQConfig) -> str:
    """What ``--unrotated-outliers`` means for ``cfg``: its value, or for "auto" "keep-float-on-loss"
    in a rotated GPTQ run (quarot, rsq with rotation on) under ``--online-rotations none``, "off"
    everywhere else.

    Why (issue 33, bench/NOTES-importance.md session 14): under ``none`` a down_proj whose input
    carries a massive activation can quantize 10-100x worse than its layer's other linears; on
    Qwen2.5-Coder-1.5B four such modules made rsq and quarot 3-bit models score 80-87 perplexity
    against plain GPTQ's 31 and full precision's 15.6. The loss rule keeps exactly those in float and
    nothing on SmolLM2. Not for gptq/rtn/fp16 (the baselines stay as published) nor where an online
    rotation reaches every down_proj (exact/export: nothing to guard)."""
    imp = cfg.importance
    if imp.unrotated_outliers != "auto":
        return imp.unrotated_outliers
    rotated = cfg.method in ("quarot", "rsq") and cfg.rotation.enabled and cfg.solver.algorithm != "rtn"
    return "keep-float-on-loss" if rotated and cfg.rotation.online == "none" else "off"


def _contradiction(cfg: RSQConfig) -> str | None:
    """Why ``cfg``'s fields are not a run of ``cfg.method`` (None when they are).

    Ablations stay expressible: rsq without rotation (the paper's), rtn with or without rotation
    (QuaRot-RTN), any importance strategy under rsq."""
    m, rotate, strategy = cfg.method, cfg.rotation.enabled, cfg.importance.strategy
    algorithm, solver = cfg.solver.algorithm, cfg.grid.format.solver
    if m == "fp16":
        return None
    if m == "rtn":
        return None if algorithm == "rtn" else f"solver.algorithm is {algorithm!r}, rtn rounds to nearest"
    if algorithm == "rtn":
        return "solver.algorithm is 'rtn' (that is --method rtn)"
    if algorithm != solver:
        return f"solver.algorithm is {algorithm!r}, but the {cfg.grid.kind} grid is solved by {solver}"
    if m == "rsq" and strategy == "uniform":
        return "importance.strategy is 'uniform' (that is quarot with rotation, gptq without)"
    if m in ("gptq", "quarot") and strategy != "uniform":
        return f"importance.strategy is {strategy!r} (token importance is --method rsq)"
    if m == "gptq" and rotate:
        return "rotation.enabled is True (that is --method quarot)"
    if m == "quarot" and not rotate:
        return "rotation.enabled is False (that is --method gptq)"
    return None


def replace(cfg: Any, **changes: Any) -> Any:
    """dataclasses.replace that re-runs validation (frozen dataclasses)."""
    assert is_dataclass(cfg)
    return dataclasses.replace(cfg, **changes)
