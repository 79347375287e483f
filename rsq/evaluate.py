"""`rsq eval`: perplexity of a model or a quantized checkpoint."""

from __future__ import annotations

from rsq.calib.datasets import eval_windows, load_text, tokenize
from rsq.eval.perplexity import perplexity
from rsq.loading import describe_source, is_rsq_checkpoint, load_model
from rsq.pipeline import resolve_device


def load_any(model: str | None):
    """(model, tokenizer) for a plain model or an rsq checkpoint directory."""
    if is_rsq_checkpoint(model):
        from rsq.checkpoint.load import load_quantized

        return load_quantized(model)
    return load_model(model)


def run_eval(model: str | None, sources, seqlen: int, max_windows: int | None, *, device: str = "auto",
             data_dir: str | None = None, progress=None) -> dict:
    net, tokenizer = load_any(model)
    dev = resolve_device(device)
    ppl = {}
    for source in sources:
        wins = eval_windows(tokenize(tokenizer, load_text(source, data_dir).eval), seqlen, max_windows)
        ppl[source] = perplexity(net, wins, dev, progress=(lambda i, n: progress(f"ppl {source}", i, n)) if progress else None)
    return {"model": describe_source(model), "perplexity": {"seqlen": seqlen, "max_windows": max_windows, **ppl}}
