"""The paper's model families at every size, as their published Hugging Face ``config.json``.

``rsq/models/configs/`` holds one file per checkpoint, named after the hub id with ``/`` replaced
by ``--`` (``meta-llama--Meta-Llama-3-8B.json``), with the published values, plus ``index.json``
mapping short names (``llama-3-8b``, ``qwen2.5-0.5b``, ...) to file, hub id and parameter count.
They let planning, memory estimates and structural tests run with no hub access and no weights.

Three things are built from a config:

* :func:`param_count` -- the number of parameters, by arithmetic on the config alone.
* meta-device models -- ``with torch.device("meta"): AutoModelForCausalLM.from_config(cfg)``
  builds the full-size module tree without memory (the tests check it against
  :func:`param_count`).
* :func:`tiny_config` -- a CPU-sized model of the same structure (rule in its docstring).

Configs are built with ``CONFIG_MAPPING[model_type](**published_dict)``, which is what
``AutoConfig.from_pretrained`` does after reading the file; it needs no network, and works with
transformers 4.51+ (``rope_scaling`` / ``rope_theta`` kept as published) and 5.x (which folds
them into ``rope_parameters``).
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

from rsq.errors import ConfigError, UnsupportedModelError
from rsq.models.adapter import config_head_dim, config_kv_heads
from rsq.models.registry import resolve

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).with_name("configs")
INDEX_FILE = CONFIG_DIR / "index.json"


# ---------------------------------------------------------------------------- lookup
@lru_cache(maxsize=1)
def _index() -> dict[str, dict[str, Any]]:
    with open(INDEX_FILE, encoding="utf-8") as f:
        return json.load(f)


def list_bundled() -> list[str]:
    """Short names of the bundled configs, in index order (family, then size)."""
    return list(_index())


def _resolve(name_or_hub_id: str) -> str:
    """Short name for a short name, hub id or file stem (case-insensitive)."""
    key = name_or_hub_id.strip().lower()
    for name, entry in _index().items():
        stem = entry["file"].removesuffix(".json")
        if key in (name, entry["hub_id"].lower(), stem.lower()):
            return name
    raise ConfigError(
        f"no bundled config named {name_or_hub_id!r}; bundled: {', '.join(list_bundled())} "
        "(short names or hub ids). To add one, put its config.json under rsq/models/configs/ "
        "and an entry in configs/index.json"
    )


def bundled_hub_id(name_or_hub_id: str) -> str:
    """The hub id of a bundled config, e.g. ``"qwen2.5-7b"`` -> ``"Qwen/Qwen2.5-7B"``."""
    return _index()[_resolve(name_or_hub_id)]["hub_id"]


def load_bundled_dict(name_or_hub_id: str) -> dict[str, Any]:
    """The published ``config.json`` of a bundled model, as a fresh dict."""
    entry = _index()[_resolve(name_or_hub_id)]
    with open(CONFIG_DIR / entry["file"], encoding="utf-8") as f:
        return json.load(f)


def config_from_dict(d: dict[str, Any]):
    """A ``PretrainedConfig`` from a config.json dict, offline: ``CONFIG_MAPPING[type](**d)``."""
    from transformers import CONFIG_MAPPING

    d = dict(d)
    model_type = d.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedModelError(
            f"config has model_type {model_type!r}, which this transformers does not know; "
            "upgrade transformers or fix the config's model_type"
        )
    return CONFIG_MAPPING[model_type](**d)


def load_bundled_config(name_or_hub_id: str):
    """The ``transformers.PretrainedConfig`` of a bundled model (no network access).

    ``name_or_path`` is set to the hub id, as ``AutoConfig.from_pretrained(hub_id)`` would.
    """
    cfg = config_from_dict(load_bundled_dict(name_or_hub_id))
    cfg._name_or_path = bundled_hub_id(name_or_hub_id)
    return cfg


# ---------------------------------------------------------------------------- arithmetic
def _biases(config) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, MLP bias) as the family's adapter declares them."""
    return resolve(config).biases(config)  # param_count takes a bare config (public helper)


def param_count(config) -> int:
    """Parameters of a decoder-only Llama/Mistral/Qwen2 causal LM, from its config alone.

    With H = hidden_size, I = intermediate_size, L = layers, V = vocab, n_q / n_kv heads of size d:

        attention = H·n_q·d (q) + 2·H·n_kv·d (k, v) + n_q·d·H (o)
                    [+ n_q·d + 2·n_kv·d with q/k/v bias] [+ H with o_proj bias]
        mlp       = 3·H·I (gate, up, down)                         [+ 2·I + H with mlp_bias]
        per layer = attention + mlp + 2·H (two RMSNorm scales)
        total     = L·per layer + H (final norm) + V·H (embedding) + V·H (lm_head, unless tied)

    Example: Qwen2.5-0.5B (H 896, I 4864, L 24, 14/2 heads of 64, V 151936, tied) gives
    24·14,912,384 + 896 + 136,134,656 = 494,032,768.
    """
    H, I_, L, V = (
        int(config.hidden_size),
        int(config.intermediate_size),
        int(config.num_hidden_layers),
        int(config.vocab_size),
    )
    n_q, n_kv, d = int(config.num_attention_heads), config_kv_heads(config), config_head_dim(config)
    qkv_bias, o_bias, mlp_bias = _biases(config)
    attention = H * n_q * d + 2 * H * n_kv * d + n_q * d * H
    attention += (n_q * d + 2 * n_kv * d) * qkv_bias + H * o_bias
    mlp = 3 * H * I_ + (2 * I_ + H) * mlp_bias
    per_layer = attention + mlp + 2 * H
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return L * per_layer + H + V * H * (1 if tied else 2)


# ---------------------------------------------------------------------------- tiny models
_DROP_FOR_TINY = (
    "_name_or_path",
    "transformers_version",
    "layer_types",
    "_commit_hash",
    "_attn_implementation_autoset",
)


def _odd_part(n: int) -> int:
    while n % 2 == 0:
        n //= 2
    return n


def tiny_config(config, *, layers: int = 2, scale: int | None = None, vocab_size: int = 512, min_head_dim: int = 8):
    """A CPU-sized config with the same structure as ``config``, for tests.

    The rule: every width -- hidden_size, intermediate_size and head_dim -- is divided by one
    power of two ``scale``; nothing else about the shape changes. By default ``scale`` is
    head_dim / min_head_dim (16 for head_dim 128, 8 for 64), so head_dim becomes 8. Hence:

    * the odd factor of every width survives, so the Hadamard bases the rotation needs stay
      the same (Qwen2.5-0.5B: hidden 896 = 7·2^7 -> 112 = 28·4, intermediate 4864 = 19·2^8 ->
      608 = 76·8; Qwen2.5-7B intermediate 18944 -> 1184 = 148·8; Llama-3 14336 -> 896 = 28·32);
    * the ratios hidden / (heads·head_dim) and intermediate / hidden are exact, so
      Mistral-Nemo keeps head_dim != hidden/heads (5120, 32·128 -> 320, 32·8) and families that
      derive head_dim = hidden/heads still derive the right one;
    * the numbers of attention and key/value heads are kept (Qwen2.5-0.5B keeps 14 and 2);
    * tied embeddings, Qwen2 q/k/v biases, attention/mlp bias flags, rope_theta and rope scaling
      (Llama-3.1/3.2 "llama3"), rms_norm_eps, activation, sliding-window settings are kept.

    What shrinks besides widths: ``layers`` decoder layers (``max_window_layers`` capped to it),
    the vocabulary (to ``vocab_size``; special token ids past its end are moved to its last ids).

    Raises ConfigError when ``scale`` is not a power of two dividing every width with an even
    head_dim left (RoPE rotates pairs).
    """
    hd = config_head_dim(config)
    H, I_ = int(config.hidden_size), int(config.intermediate_size)
    if scale is None:
        scale = max(1, hd // min_head_dim)
    if scale < 1 or scale & (scale - 1):
        raise ConfigError(f"tiny_config scale must be a power of two, got {scale}")
    if hd % (2 * scale) or H % scale or I_ % scale:
        raise ConfigError(
            f"tiny_config scale {scale} does not divide head_dim {hd} (leaving it even), "
            f"hidden_size {H} and intermediate_size {I_}; pass a smaller power of two"
        )

    d = config.to_dict()
    for key in _DROP_FOR_TINY:
        d.pop(key, None)
    d.update(hidden_size=H // scale, intermediate_size=I_ // scale, num_hidden_layers=layers)
    if d.get("head_dim"):
        d["head_dim"] = hd // scale
    if d.get("max_window_layers") is not None:
        d["max_window_layers"] = min(int(d["max_window_layers"]), layers)
    vocab = min(vocab_size, int(config.vocab_size))
    d["vocab_size"] = vocab
    _move_special_ids(d, vocab)

    tiny = config_from_dict(d)
    # internal invariants of the rule above (not user errors)
    assert config_head_dim(tiny) == hd // scale, (config_head_dim(tiny), hd, scale)
    assert _odd_part(tiny.hidden_size) == _odd_part(H)
    assert _odd_part(tiny.intermediate_size) == _odd_part(I_)
    logger.debug(
        "tiny %s: hidden %d, intermediate %d, head_dim %d (scale %d)",
        config.model_type,
        tiny.hidden_size,
        tiny.intermediate_size,
        hd // scale,
        scale,
    )
    return tiny


_SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _move_special_ids(d: dict[str, Any], vocab: int) -> None:
    """Move special token ids past the end of a ``vocab``-token vocabulary onto its last ids.

    Distinct ids stay distinct and equal ids stay equal (Qwen2.5 has bos == eos): the largest
    out-of-range id goes to vocab-1, the next to vocab-2, and so on.
    """

    def ids(v):
        return [] if v is None else list(v) if isinstance(v, (list, tuple)) else [v]

    outside = sorted({t for k in _SPECIAL_IDS for t in ids(d.get(k)) if t >= vocab}, reverse=True)
    moved = {t: vocab - 1 - i for i, t in enumerate(outside)}
    for key in _SPECIAL_IDS:
        v = d.get(key)
        if isinstance(v, (list, tuple)):
            d[key] = [moved.get(t, t) for t in v]
        elif v is not None:
            d[key] = moved.get(v, v)
