"""`rsq eval`: perplexity of a model or a quantized checkpoint, and the shared loader (`load_any`,
`dense_linears`) of the eval, longctx and generate commands."""

from __future__ import annotations

import math
import time

from rsq.calib.datasets import eval_windows, load_text, tokenize
from rsq.eval.perplexity import perplexity
from rsq.io.loading import describe_source, is_rsq_checkpoint, load_model
from rsq.log import eval_done
from rsq.models.device import resolve_device


def load_any(model: str | None, packed: bool = False):
    """(model, tokenizer) for a plain model or an rsq checkpoint directory (``packed``: keep the
    packed reference path on CPU instead of the once-dequantized weights; rsq/checkpoint/dense.py)."""
    if is_rsq_checkpoint(model):
        from rsq.io.hf import load_adopted

        return load_adopted(model, packed=packed)
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

    from rsq.rotation.online import attach_online_rotation

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
    batch_size: int | None = None,
    force_seqlen: bool = False,
) -> dict:
    """Perplexity of ``model`` on each source; ``loaded``: an already loaded (model, tokenizer).
    Inputs are checked (and every text read) before the model is loaded; a NaN/Inf perplexity
    raises NonFiniteError. ``batch_size``: windows per forward (None: the most, up to 4, that fits)."""
    from rsq.errors import NonFiniteError
    from rsq.plan import preflight
    from rsq.plan.memory import eval_batch_that_fits

    preflight.check_lengths(
        ppl_seqlen=seqlen, ppl_max_windows=max_windows, ppl_batch_size=batch_size, seqlen_flag="--seqlen"
    )
    dev = resolve_device(device)
    texts = {source: load_text(source, data_dir) for source in sources}
    net, tokenizer = loaded if loaded is not None else load_any(model)
    preflight.check_context(net.config, {"--seqlen": seqlen}, force_seqlen)
    batch = batch_size or eval_batch_that_fits(net.config, seqlen, dev)
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
