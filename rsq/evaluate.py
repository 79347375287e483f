"""`rsq eval`: perplexity of a model or a quantized checkpoint, and the shared loader (`load_any`,
`dense_linears`) of the eval, longctx and generate commands."""

from __future__ import annotations

from rsq.calib.datasets import eval_windows, load_text, tokenize
from rsq.eval.perplexity import perplexity
from rsq.loading import describe_source, is_rsq_checkpoint, load_model
from rsq.pipeline import resolve_device


def load_any(model: str | None, packed: bool = False):
    """(model, tokenizer) for a plain model or an rsq checkpoint directory (``packed``: keep the
    packed reference path on CPU instead of the once-dequantized weights; rsq/checkpoint/dense.py)."""
    if is_rsq_checkpoint(model):
        from rsq.checkpoint.load import load_quantized

        return load_quantized(model, packed=packed)
    return load_model(model)


def dense_linears(model) -> int:
    """Replace every packed linear (a module with ``dequantize_weight``) by an ``nn.Linear`` holding
    W_hat in the model's floating dtype; return how many were replaced. An online rotation on the
    packed linear's input moves to the dense one.

    The same function: the CPU reference kernel also computes x @ W_hat^T from W_hat dequantized in
    float32, only on every call; once is much faster for generation on CPU (one decoding step
    re-dequantizes every layer) and costs the dense weights' memory. Float32 models agree up to the
    summation order of the matmul.
    """
    import torch
    from torch import nn

    from rsq.nn.hadamard import attach_online_rotation

    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) or not hasattr(child, "dequantize_weight"):
                continue
            with torch.no_grad():
                weight = child.dequantize_weight(torch.float32).to(dtype)
                bias = None if child.bias is None else child.bias.to(dtype)
            dense = nn.Linear(child.in_features, child.out_features, bias=bias is not None, device="meta")
            dense.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                dense.bias = nn.Parameter(bias, requires_grad=False)
            rotation = getattr(child, "online_rotation", None)
            if rotation is not None:
                attach_online_rotation(dense, rotation.spec)
            setattr(parent, name, dense)
            count += 1
    return count


def run_eval(
    model: str | None,
    sources,
    seqlen: int,
    max_windows: int | None,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    progress=None,
    loaded=None,
) -> dict:
    """Perplexity of ``model`` on each source; ``loaded``: an already loaded (model, tokenizer)."""
    net, tokenizer = loaded if loaded is not None else load_any(model)
    dev = resolve_device(device)
    ppl = {}
    for source in sources:
        wins = eval_windows(tokenize(tokenizer, load_text(source, data_dir).eval), seqlen, max_windows)
        ppl[source] = perplexity(
            net, wins, dev, progress=(lambda i, n: progress(f"ppl {source}", i, n)) if progress else None
        )
    return {"model": describe_source(model), "perplexity": {"seqlen": seqlen, "max_windows": max_windows, **ppl}}
