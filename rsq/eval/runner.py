"""`rsq eval`: perplexity of a model or a quantized checkpoint (loaded by
:func:`rsq.io.hf.load_any`)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from rsq.calib.datasets import eval_windows, load_text, tokenize
from rsq.config import EVAL_SEQLEN, EVAL_WINDOWS
from rsq.errors import NonFiniteError
from rsq.eval.perplexity import perplexity
from rsq.io.hf import load_any
from rsq.io.loading import describe_source
from rsq.log import eval_done
from rsq.models.device import resolve_device
from rsq.models.registry import resolve
from rsq.plan import preflight
from rsq.plan.memory import eval_batch_that_fits


@dataclass(frozen=True)
class PerplexityOptions:
    """The windows :func:`run_eval` evaluates: ``seqlen`` tokens each, at most ``max_windows``
    (None: all); ``batch_size`` windows per forward (None: the most, up to 4, that fits);
    ``force_seqlen``: allow windows beyond the model's context; ``data_dir``: where the texts are."""

    seqlen: int = EVAL_SEQLEN
    max_windows: int | None = EVAL_WINDOWS
    batch_size: int | None = None
    force_seqlen: bool = False
    data_dir: str | None = None


def run_eval(
    model: str | None,
    sources,
    options: PerplexityOptions | None = None,
    *,
    device: str = "auto",
    progress=None,
    loaded=None,
    **fields,
) -> dict:
    """Perplexity of ``model`` on each source (``options``: :class:`PerplexityOptions`, ``fields``
    replace some of its fields); ``loaded``: an already loaded (model, tokenizer). Inputs are
    checked (and every text read) before the model is loaded; a NaN/Inf perplexity raises
    NonFiniteError."""
    opts = replace(options or PerplexityOptions(), **fields)
    seqlen, max_windows = opts.seqlen, opts.max_windows
    preflight.check_lengths(
        ppl_seqlen=seqlen, ppl_max_windows=max_windows, ppl_batch_size=opts.batch_size, seqlen_flag="--seqlen"
    )
    dev = resolve_device(device)
    texts = {source: load_text(source, opts.data_dir) for source in sources}
    net, tokenizer = loaded if loaded is not None else load_any(model)
    preflight.check_context(net.config, {"--seqlen": seqlen}, opts.force_seqlen)
    # evaluation starts from a model name or a loaded model: its family looked up once, here
    batch = opts.batch_size or eval_batch_that_fits(net.config, resolve(net), seqlen, dev)
    ppl = {}
    for source in sources:
        t0 = time.perf_counter()
        wins = eval_windows(tokenize(tokenizer, texts[source].eval), seqlen, max_windows)
        ppl[source] = perplexity(
            net, wins, dev, batch, progress=(lambda i, n: progress(f"ppl {source}", i, n)) if progress else None
        )
        if not math.isfinite(ppl[source]):
            raise NonFiniteError(
                f"perplexity of {describe_source(model)} on {source} is {ppl[source]} (evaluation stage): the "
                "model's logits are NaN/Inf (NaN/Inf weights, or overflow in float16/bfloat16): check its weights "
                "or evaluate with --dtype float32"
            )
        eval_done(source, ppl[source], wins.shape[0], wins.shape[1], time.perf_counter() - t0)
    return {"model": describe_source(model), "perplexity": {"seqlen": seqlen, "max_windows": max_windows, **ppl}}
