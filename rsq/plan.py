"""`rsq plan`: what a run will do and need, from a model's config alone (no weights).

For every rotation site: the order, the Hadamard recipe or the fallback. Memory for calibration at
N × T tokens: model weights, one decoder layer on the device, calibration activations (sharded over
K ranks), Hessians, attention-importance chunks, and the packed checkpoint size.
"""

from __future__ import annotations

from dataclasses import dataclass

from rsq.models.registry import resolve
from rsq.rotation.hadamard import hadamard_kind, has_hadamard

GiB = 1024**3


@dataclass
class Site:
    name: str
    order: int
    recipe: str


def rotation_plan(config, fallback: str = "skip") -> list[Site]:
    adapter = resolve(config)
    hd, heads = adapter.head_dim(config), adapter.num_heads(config)
    sites = []
    for name, order in (
        ("residual (R1)", config.hidden_size),
        ("down_proj input", config.intermediate_size),
        ("v_proj per head", hd),
        ("o_proj cross-head", heads),
    ):
        if has_hadamard(order):
            recipe = hadamard_kind(order)
        elif name.startswith("residual"):
            recipe = "random orthogonal (no Hadamard of this order)"
        else:
            recipe = f"{'random orthogonal' if fallback == 'random' else 'skipped'} (no Hadamard of order {order})"
        sites.append(Site(name, order, recipe))
    return sites


def layer_linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of one decoder layer."""
    adapter = resolve(config)
    d, inter = config.hidden_size, config.intermediate_size
    hd, heads, kv = adapter.head_dim(config), adapter.num_heads(config), adapter.num_kv_heads(config)
    return {
        "q_proj": (heads * hd, d),
        "k_proj": (kv * hd, d),
        "v_proj": (kv * hd, d),
        "o_proj": (d, heads * hd),
        "gate_proj": (inter, d),
        "up_proj": (inter, d),
        "down_proj": (d, inter),
    }


def param_counts(config) -> dict[str, int]:
    shapes = layer_linear_shapes(config)
    per_layer = sum(o * i for o, i in shapes.values()) + 2 * config.hidden_size
    qkv, o, mlp = resolve(config).biases(config)
    biased = ("q_proj", "k_proj", "v_proj") * qkv + ("o_proj",) * o + ("gate_proj", "up_proj", "down_proj") * mlp
    per_layer += sum(shapes[k][0] for k in biased)
    embed = config.vocab_size * config.hidden_size
    head = 0 if getattr(config, "tie_word_embeddings", False) else embed
    return {
        "per_layer": per_layer,
        "linear_per_layer": sum(o * i for o, i in shapes.values()),
        "embed": embed,
        "lm_head": head,
        "total": embed + head + config.num_hidden_layers * per_layer + config.hidden_size,
    }


def memory_plan(
    config,
    *,
    nsamples: int = 256,
    seqlen: int = 4096,
    bits: int = 3,
    ranks: int = 1,
    act_bytes: int = 2,
    weight_bytes: int = 2,
    query_chunk: int = 512,
    batch: int = 8,
    group_size: int = -1,
) -> dict[str, float]:
    """Bytes (as GiB) per rank. Activations are sharded over ranks; one layer is on each device."""
    p = param_counts(config)
    shapes = layer_linear_shapes(config)
    d, inter = config.hidden_size, config.intermediate_size
    heads = resolve(config).num_heads(config)
    acts = nsamples * seqlen * d * act_bytes / ranks
    # one Hessian per distinct linear input: qkv (d), o (heads*hd), gate/up (d), down (inter); fp32
    hess = 4 * max(d, inter) ** 2 + 4 * max(d, inter) ** 2  # the accumulating one + the solver's copy
    layer = p["per_layer"] * weight_bytes
    # per batch on the device: layer activations in flight (MLP width dominates) + attention chunk
    inflight = batch * seqlen * (3 * inter + 4 * d) * act_bytes + batch * heads * query_chunk * seqlen * 4
    n_groups = 1 if group_size == -1 else None
    packed = 0.0
    for out_f, in_f in shapes.values():
        groups = n_groups or in_f // group_size
        packed += out_f * in_f * bits / 8 + out_f * groups * (weight_bytes + 1)
    packed = packed * config.num_hidden_layers + (p["embed"] + p["lm_head"]) * weight_bytes
    return {
        "model_weights_host_GiB": p["total"] * weight_bytes / GiB,
        "layer_on_device_GiB": layer / GiB,
        "calib_activations_per_rank_GiB": acts / GiB,
        "hessians_GiB": hess / GiB,
        "in_flight_GiB": inflight / GiB,
        "device_peak_estimate_GiB": (layer + hess + inflight) / GiB,
        "device_peak_if_activations_on_device_GiB": (layer + hess + inflight + acts) / GiB,
        "checkpoint_GiB": packed / GiB,
        "bf16_model_GiB": p["total"] * 2 / GiB,
    }


def format_plan(name: str, config, **kw) -> list[str]:
    p = param_counts(config)
    lines = [
        f"{name}: {p['total'] / 1e9:.2f}B parameters, hidden {config.hidden_size}, intermediate "
        f"{config.intermediate_size}, {config.num_hidden_layers} layers, heads {config.num_attention_heads}"
        f"/{getattr(config, 'num_key_value_heads', config.num_attention_heads)}, "
        f"head_dim {resolve(config).head_dim(config)}, "
        f"tied embeddings {bool(getattr(config, 'tie_word_embeddings', False))}"
    ]
    for site in rotation_plan(config):
        lines.append(f"  rotation {site.name:<18} order {site.order:>6}: {site.recipe}")
    mem = memory_plan(config, **kw)
    for k, v in mem.items():
        lines.append(f"  {k:<42} {v:10.2f}")
    return lines


def fit_host_memory(config, cfg, *, device, ppl_seqlen, ppl_batch_size, ranks=1, enforce=True, preloaded=False) -> dict:
    return {"ppl_batch_size": ppl_batch_size or 4}


def eval_batch_that_fits(config, seqlen, device) -> int:
    return 4
