"""Per-token importance ("Scale", spec §3) as pure functions of tensors.

Each strategy maps an :class:`ImportanceContext` (the tensors of one batch of B calibration
sequences of length T at one decoder layer) to raw scores (B, T). :func:`to_weights` turns raw
scores into Hessian weights w (B, T) with mean 1 per sequence (spec §3.2 steps 4–5):

    s  <- s ** power                                  (optional, s >= 0)
    s  <- -s                                          (reversed strategies: low raw = important)
    r  = r_min + (r_max - r_min) (s - lo) / (hi - lo), clamped to [r_min, r_max]
         lo, hi = min, max of s over the sequence (or its q and 1-q quantiles)
    w  = r / mean_t(r)
    w  <- min(w, K median_t(w)), then w / mean_t(w)   (optional cap K, ImportanceConfig.cap)

0/1 position masks skip the first three steps (they are only renormalised to mean 1) and
``uniform`` returns exact ones. :func:`compute_weights` is the one entry point.

Strategies register under a name with :func:`register_strategy`, declaring which context fields
they need so the caller computes only those (:func:`strategy_needs`). Names of the form
"a_b_..._N" are chunk masks built on the fly. Nothing here knows about models: the caller supplies
post-RoPE q/k, layer inputs/outputs and token ids.

Dataset expansion (spec §5) by cyclic rolls is here too: :func:`expand_rolls` builds the expanded
id tensor, :func:`rolled_window` one of its rows without building it.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from rsq.config import ImportanceConfig
from rsq.errors import CalibrationError, ConfigError

log = logging.getLogger(__name__)

CONTEXT_FIELDS = frozenset({"x", "y", "q", "k", "token_ids", "token_counts"})


@dataclass
class ImportanceContext:
    """What a strategy may read, for one batch of B sequences of length T at one layer.

    x: (B, T, D) layer input (residual stream, before the layer's norm).
    y: (B, T, D) the layer's full-precision output.
    q: (B, Hq, T, d) post-RoPE queries; k: (B, Hkv, T, d) post-RoPE keys (Hq a multiple of Hkv).
    token_ids: (B, T) long, the ids of these sequences.
    token_counts: (V,) counts of every token id over the whole (expanded) calibration set.
    cfg: the importance options (r_min, r_max, normalize, power, quantile, query_chunk).
    kernels: "auto" (Triton kernels on CUDA where they apply) or "reference" (RSQConfig.kernels).
    Fields a strategy does not declare in its ``needs`` may stay None.
    """

    cfg: ImportanceConfig = field(default_factory=ImportanceConfig)
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None
    token_ids: torch.Tensor | None = None
    token_counts: torch.Tensor | None = None
    kernels: str = "auto"

    def batch_shape(self) -> tuple[tuple[int, int], torch.device]:
        """(B, T) and the device, read from whichever tensor field is set."""
        for t in (self.x, self.y, self.token_ids):
            if t is not None:
                return (t.shape[0], t.shape[1]), t.device
        for t in (self.q, self.k):
            if t is not None:
                return (t.shape[0], t.shape[2]), t.device
        raise ValueError("ImportanceContext has no tensor set: pass at least x or token_ids")


@dataclass(frozen=True)
class Strategy:
    """A registered strategy. kind: 'score' (min–max then mean 1), 'mask' (0/1, mean 1 only) or
    'ones' (exact ones)."""

    name: str
    fn: Callable[[ImportanceContext], torch.Tensor]
    needs: frozenset[str]
    reverse: bool = False
    kind: str = "score"


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, *, needs: set[str], reverse: bool = False, kind: str = "score"):
    """Decorator: register ``fn(ctx) -> (B, T)`` under ``name``."""
    unknown = set(needs) - CONTEXT_FIELDS
    assert not unknown, f"unknown context fields {unknown}"
    assert kind in ("score", "mask", "ones")

    def deco(fn: Callable[[ImportanceContext], torch.Tensor]):
        STRATEGIES[name] = Strategy(name, fn, frozenset(needs), reverse, kind)
        return fn

    return deco


_MASK_NAME = re.compile(r"^\d+(_\d+)+$")


def get_strategy(name: str) -> Strategy:
    """The registered strategy, or a chunk mask for a name "a_b_..._N"; ConfigError otherwise."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    if _MASK_NAME.match(name):
        chunks, n = _parse_mask(name)
        return Strategy(name, lambda ctx: chunk_mask(ctx, chunks, n), frozenset({"x"}), kind="mask")
    raise ConfigError(
        f"unknown importance strategy {name!r}: choose one of {', '.join(sorted(STRATEGIES))} "
        "or a chunk mask 'a_b_..._N' (keep chunks a, b, ... of N equal chunks)"
    )


def strategy_needs(name: str) -> set[str]:
    """The ImportanceContext fields strategy ``name`` reads (raises ConfigError if unknown)."""
    return set(get_strategy(name).needs)


# ---------------------------------------------------------------------------------------------
# attention received (AttnCon)


def _check_qk(q: torch.Tensor, k: torch.Tensor) -> int:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, H, T, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    b, hq, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or hq % k.shape[1]:
        raise ValueError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} do not match: need the same B, T, d "
            "and query heads a multiple of key/value heads"
        )
    return hq // k.shape[1]


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    # at least float32 (fp32 softmax as in the reference); float64 inputs stay float64
    return torch.promote_types(q.dtype, torch.float32)


def _score_dtype(q: torch.Tensor) -> torch.dtype:
    """dtype of the q·kᵀ product: half inputs on CUDA multiply in their own dtype on the tensor
    cores (as the reference's eager attention does; the softmax stays fp32), else _compute_dtype."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return q.dtype
    return _compute_dtype(q)


def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    query_chunk: int = 512,
    scale: float | None = None,
    kernels: str = "auto",
) -> torch.Tensor:
    """Total attention each key token receives, summed over heads and queries (spec §3.2).

        A[h, i, j] = softmax_j(q_h,i · k_g(h),j · scale + mask[i, j]),   g(h) = h // (Hq / Hkv)
        s_j = Σ_h Σ_i A[h, i, j]

    q: (B, Hq, T, d) post-RoPE queries; k: (B, Hkv, T, d) post-RoPE keys (GQA as HF repeat_kv).
    scale defaults to 1/sqrt(d); mask is -inf above the diagonal when ``causal``.
    Returns s: (B, T) in float32 (float64 for float64 inputs). The softmax is float32; q·kᵀ is
    float32 on the CPU and, for bf16/fp16 inputs on CUDA, in that dtype on the tensor cores (as the
    reference's eager attention). On CUDA with Triton, half inputs go to
    rsq.kernels.triton_attention instead: the same sums from two QKᵀ passes (row log-sum-exp, then
    column sums of exp(logit - lse)) with float32 logits, no probability tensor
    (``kernels="reference"`` keeps the torch path everywhere).

    Memory: one sequence and ``query_chunk`` queries at a time, O(Hq · chunk · T); the (Hq, T, T)
    probability tensor is never built. With causal masking a chunk only scores the keys it can see.
    Example: with causal masking every row of A sums to 1, so Σ_j s_j = Hq · T.
    """
    group = _check_qk(q, k)
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    if kernels == "auto" and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k.dtype == q.dtype:
        from rsq.kernels import has_triton

        if has_triton():
            from rsq.kernels.triton_attention import attention_received_triton, supports

            if supports(q, k):
                return attention_received_triton(q, k, causal=causal, scale=scale)
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dtype = _compute_dtype(q)
    sdtype = _score_dtype(q)
    out = torch.zeros(b, t, dtype=dtype, device=q.device)
    pos = torch.arange(t, device=q.device)
    for bi in range(b):
        qb = q[bi].to(sdtype).view(hkv, group, t, d)  # (Hkv, G, T, d): head h = kv*G + g
        kb = k[bi].to(sdtype).unsqueeze(1)  # (Hkv, 1, T, d)
        for i0 in range(0, t, query_chunk):
            i1 = min(i0 + query_chunk, t)
            n_keys = i1 if causal else t  # causal: keys after the chunk's last query get 0
            scores = (qb[:, :, i0:i1] @ kb[:, :, :n_keys].transpose(-1, -2)) * scale  # (Hkv,G,c,K)
            if causal:
                future = pos[None, :n_keys] > pos[i0:i1, None]  # (c, K)
                scores = scores.masked_fill(future, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=dtype)
            out[bi, :n_keys] += probs.sum(dim=(0, 1, 2))
    return out


def attention_received_naive(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Oracle for :func:`attention_received`: materialises the (B, Hq, T, T) probabilities."""
    group = _check_qk(q, k)
    t, d = q.shape[2], q.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    dtype, sdtype = _compute_dtype(q), _score_dtype(q)
    k_rep = k.to(sdtype).repeat_interleave(group, dim=1)  # (B, Hq, T, d), as HF repeat_kv
    scores = (q.to(sdtype) @ k_rep.transpose(-1, -2)) * scale
    if causal:
        future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=dtype).sum(dim=(1, 2))


# ---------------------------------------------------------------------------------------------
# raw-score strategies (spec §3.3); all return (B, T) scores >= 0


def _need(ctx: ImportanceContext, name: str) -> torch.Tensor:
    value = getattr(ctx, name)
    if value is None:
        raise ValueError(f"this importance strategy needs ctx.{name}, which is None")
    return value


@register_strategy("attncon", needs={"q", "k"})
def attncon(ctx: ImportanceContext) -> torch.Tensor:
    """Attention received; normalize 'linear'/'sqrt' divides s_j by (T - j) or sqrt(T - j),
    the number of queries that see token j under causal masking."""
    s = attention_received(_need(ctx, "q"), _need(ctx, "k"), query_chunk=ctx.cfg.query_chunk, kernels=ctx.kernels)
    if ctx.cfg.normalize != "none":
        t = s.shape[-1]
        seen = torch.arange(t, 0, -1, dtype=s.dtype, device=s.device)  # T - j
        s = s / (seen if ctx.cfg.normalize == "linear" else seen.sqrt())
    return s


@register_strategy("actnorm", needs={"x"})
def actnorm(ctx: ImportanceContext) -> torch.Tensor:
    """‖x_t‖₂ of the layer input (large norm = important)."""
    return _need(ctx, "x").float().norm(dim=-1)


@register_strategy("actdiff", needs={"x", "y"}, reverse=True)
def actdiff(ctx: ImportanceContext) -> torch.Tensor:
    """‖y_t − x_t‖₂, the residual update; reversed (tokens the layer changes least = important)."""
    return (_need(ctx, "y").float() - _need(ctx, "x").float()).norm(dim=-1)


@register_strategy("tokenfreq", needs={"token_ids", "token_counts"}, reverse=True)
def tokenfreq(ctx: ImportanceContext) -> torch.Tensor:
    """Calibration-set count of each token's id; reversed (rare = important).

    The count is looked up from the sequence's own ids, so it stays aligned with the sequence
    whatever order the sequences come in (the reference code misaligns them, spec §3.3).
    """
    ids = _need(ctx, "token_ids").long()
    counts = _need(ctx, "token_counts").to(ids.device)
    return counts[ids].float()


@register_strategy("tokensim", needs={"x"})
def tokensim(ctx: ImportanceContext) -> torch.Tensor:
    """mean_j ‖x_t − x_j‖² over the tokens j of the same sequence (far from the others = important).

    Computed in float32 through the exact identity (x̄ = mean_j x_j)
        mean_j ‖x_t − x_j‖² = ‖x_t − x̄‖² + mean_j ‖x_j − x̄‖²,
    i.e. the norms/Gram-matrix expansion summed over j before it is formed: O(T·D) instead of
    O(T²·D), and centred, so no cancellation between large norms (residual-stream outliers).
    """
    x = _need(ctx, "x").float()
    xc = x - x.mean(dim=1, keepdim=True)  # (B, T, D)
    sq = xc.pow(2).sum(dim=-1)  # (B, T)
    return sq + sq.mean(dim=1, keepdim=True)


@register_strategy("uniform", needs={"x"}, kind="ones")
def uniform(ctx: ImportanceContext) -> torch.Tensor:
    """All ones: plain GPTQ."""
    shape, device = ctx.batch_shape()
    return torch.ones(shape, dtype=torch.float32, device=device)


def _parse_mask(name: str) -> tuple[tuple[int, ...], int]:
    parts = [int(p) for p in name.split("_")]
    chunks, n = tuple(parts[:-1]), parts[-1]
    bad = [c for c in chunks if c >= n]
    if n < 1 or bad:
        raise ConfigError(
            f"chunk mask {name!r}: chunk indices must be < the chunk count {n} (bad: {bad}); "
            "write 'a_b_..._N' with 0 <= a, b, ... < N"
        )
    return chunks, n


def chunk_mask(ctx: ImportanceContext, chunks: tuple[int, ...], n: int) -> torch.Tensor:
    """0/1 mask (B, T): split T into ``n`` equal chunks, 1 on the listed chunk indices."""
    (b, t), device = ctx.batch_shape()
    if t % n:
        raise ConfigError(
            f"chunk mask over {n} chunks needs the sequence length to be divisible by {n}, "
            f"but T = {t}: choose --seqlen a multiple of {n} or another mask"
        )
    chunk_of = torch.arange(t, device=device) // (t // n)
    keep = torch.isin(chunk_of, torch.tensor(chunks, dtype=torch.long, device=device))
    return keep.float().expand(b, t).clone()


def _register_mask(name: str, spec: str, doc: str) -> None:
    chunks, n = _parse_mask(spec)

    def fn(ctx: ImportanceContext) -> torch.Tensor:
        return chunk_mask(ctx, chunks, n)

    fn.__doc__ = doc
    register_strategy(name, needs={"x"}, kind="mask")(fn)


_register_mask("firstn", "0_8", "First T/8 tokens (reference '0_8').")
_register_mask("heuristic", "0_8", "Alias of firstn (the reference's heuristic default).")
_register_mask("firstlastn", "0_31_32", "First and last T/32 tokens (reference '0_31_32').")
_register_mask(
    "first_half",
    "0_2",
    "The first T/2 tokens. The reference code's 'first_half' keeps the *second* half (its names "
    "are inverted); rsq uses the literal meaning.",
)
_register_mask(
    "second_half",
    "1_2",
    "The last T/2 tokens. The reference code's 'second_half' keeps the *first* half (its names "
    "are inverted); rsq uses the literal meaning.",
)


# ---------------------------------------------------------------------------------------------
# scores -> weights


def to_weights(
    scores: torch.Tensor,
    cfg: ImportanceConfig,
    *,
    reverse: bool,
    bounded: bool = True,
    name: str | None = None,
) -> torch.Tensor:
    """Raw scores (B, T) -> Hessian weights (B, T), float32, mean 1 per sequence (spec §3.2).

    bounded: s <- s**cfg.power (if != 1), negate if ``reverse``, min–max per sequence to
        [r_min, r_max] (cfg.quantile = q > 0: the q and 1-q quantiles instead of min and max, then
        clamp), then w = r / mean(r); with cfg.cap = K > 0, :func:`cap_weights` (w at most K x the
        sequence's median). A sequence whose range is zero (all scores equal) gets ones.
    not bounded (0/1 masks): only w = s / mean(s); ``reverse`` is not allowed.
    Raises CalibrationError (naming the strategy) on NaN/Inf scores.
    Example: s = [0, 1, 3], [r_min, r_max] = [0.005, 1] -> r = [0.005, 0.3367, 1]
        -> w ≈ [0.0112, 0.7528, 2.2360].
    """
    label = name or cfg.strategy
    s = scores.float()
    _check_finite(s, label, "raw scores")
    if s.dim() != 2:
        raise ValueError(f"scores must be (B, T), got {tuple(s.shape)}")
    if not bounded:
        if reverse:
            raise ValueError("reverse needs bounded=True: a reversed 0/1 mask is not a weight")
        mean = s.mean(dim=1, keepdim=True)
        if (s < 0).any() or (mean <= 0).any():
            raise CalibrationError(
                f"importance {label!r}: unbounded scores must be >= 0 with a positive mean in every sequence"
            )
        return s / mean
    if cfg.power != 1.0:
        s = s.pow(cfg.power)
        _check_finite(s, label, f"scores ** {cfg.power} (negative raw scores?)")
    if reverse:
        s = -s
    if cfg.quantile > 0:
        lo = torch.quantile(s, cfg.quantile, dim=1, keepdim=True)
        hi = torch.quantile(s, 1.0 - cfg.quantile, dim=1, keepdim=True)
    else:
        lo = s.amin(dim=1, keepdim=True)
        hi = s.amax(dim=1, keepdim=True)
    span = hi - lo
    flat = span <= 0  # (B, 1): constant sequence -> ones
    r = cfg.r_min + (cfg.r_max - cfg.r_min) * (s - lo) / torch.where(flat, 1.0, span)
    r = r.clamp(cfg.r_min, cfg.r_max)
    r = torch.where(flat, 1.0, r)
    if flat.any():
        log.debug("importance %r: %d sequence(s) with constant scores get weight 1", label, int(flat.sum()))
    w = r / r.mean(dim=1, keepdim=True)
    return cap_weights(w, cfg.cap) if cfg.cap else w


def cap_weights(w: torch.Tensor, k: float) -> torch.Tensor:
    """Cap each weight at ``k`` times its sequence's median, then renormalise to mean 1 per sequence.

    w: (B, T) positive weights; k >= 1. For k >= 1 the cap leaves the median where it was, so after
    the renormalisation no token weighs more than k times the median of its sequence. Made for the
    attention sinks: attncon gives the first tokens 5-97x the median weight, and they are the tokens
    with massive activations that dominate the Hessian of a linear whose input is not rotated (issue
    33). The median is torch's (the lower of the two middle values for an even T). A sequence whose
    median is not positive is returned unchanged (the cap would zero it).
    Example: w = [4, 1, 1, 1, 1, 1] (mean 1.5 before normalising), k = 2 -> [2, 1, 1, 1, 1, 1]
    -> [12/7, 6/7, 6/7, 6/7, 6/7, 6/7].
    """
    if k < 1:
        raise ValueError(f"cap k must be >= 1, got {k}")
    med = w.median(dim=1, keepdim=True).values
    capped = torch.minimum(w, k * med)
    capped = torch.where(med > 0, capped, w)
    return capped / capped.mean(dim=1, keepdim=True)


def _check_finite(s: torch.Tensor, label: str, what: str) -> None:
    if not torch.isfinite(s).all():
        bad = int((~torch.isfinite(s)).sum())
        raise CalibrationError(
            f"importance {label!r}: {bad} non-finite value(s) in the {what}; the layer's "
            "activations overflowed or are NaN (try --dtype float32 or another strategy)"
        )


def compute_weights(name: str, ctx: ImportanceContext) -> torch.Tensor:
    """Weights (B, T), float32, mean 1 per sequence, of strategy ``name`` on ``ctx``.

    'uniform' returns exact ones; masks are renormalised only; scores go through
    :func:`to_weights` with the strategy's ``reverse`` flag.
    """
    strategy = get_strategy(name)
    missing = [f for f in sorted(strategy.needs) if getattr(ctx, f) is None]
    if missing:
        raise ValueError(f"importance {name!r} needs ctx fields {missing}, which are None")
    raw = strategy.fn(ctx)
    if strategy.kind == "ones":
        return raw.float()
    return to_weights(raw, ctx.cfg, reverse=strategy.reverse, bounded=strategy.kind == "score", name=name)


# ---------------------------------------------------------------------------------------------
# dataset expansion (spec §5)


def _roll_step(t: int, factor: int) -> int:
    if factor < 1:
        raise ConfigError(f"--expand {factor} must be >= 1")
    if t % factor:
        raise ConfigError(
            f"--expand {factor} needs the sequence length to be divisible by {factor}, "
            f"but T = {t}: "
            f"choose --seqlen a multiple of {factor}"
        )
    return t // factor


def expand_rolls(token_ids: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, T) -> (N·F, T): each window followed by its cyclic rolls by f·T/F, f = 0..F-1.

    Row n·F + f is torch.roll(token_ids[n], f·T/F) (positive direction). Example, T = 8, F = 4:
    [1..8], [7,8,1..6], [5..8,1..4], [3..8,1,2].
    """
    n, t = token_ids.shape
    step = _roll_step(t, factor)
    rows = [torch.roll(token_ids, shifts=f * step, dims=1) for f in range(factor)]
    return torch.stack(rows, dim=1).reshape(n * factor, t)  # (N, F, T) -> (N·F, T)


def rolled_window(token_ids: torch.Tensor, index: int, factor: int) -> torch.Tensor:
    """Row ``index`` (T,) of ``expand_rolls(token_ids, factor)`` without building it."""
    n, t = token_ids.shape
    step = _roll_step(t, factor)
    if not 0 <= index < n * factor:
        raise IndexError(f"window {index} out of range for {n} windows x {factor} rolls")
    window, f = divmod(index, factor)
    return torch.roll(token_ids[window], shifts=f * step)
