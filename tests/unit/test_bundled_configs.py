"""Bundled published configs: offline loading, parameter arithmetic, full-size meta models and
structurally identical tiny CPU models (rsq/models/bundled.py)."""

from __future__ import annotations

import json

import pytest
import torch

from rsq.errors import ConfigError
from rsq.models.bundled import (
    CONFIG_DIR,
    bundled_hub_id,
    list_bundled,
    load_bundled_config,
    load_bundled_dict,
    param_count,
    tiny_config,
)

NAMES = list_bundled()

# Sizes as the model cards / papers print them (billions). They carry three significant digits
# and some are truncated rather than rounded (Qwen2.5-14B counts 14.770e9, printed 14.7B), so a
# faithful count may differ by up to one unit in the last digit: at most 0.82 % here
# (Qwen2.5-0.5B: 0.494 vs 0.49). Tolerance 1 %: a wrong width, a missing or extra head, tied
# vs untied embeddings, or two layers fewer/more on the deepest model all exceed it.
PUBLISHED_B = {
    "llama-3-8b": 8.03,
    "llama-3-70b": 70.6,
    "llama-3.1-8b": 8.03,
    "llama-3.2-1b": 1.24,
    "llama-3.2-3b": 3.21,
    "mistral-7b-v0.3": 7.25,
    "mistral-nemo-12b": 12.2,
    "qwen2.5-0.5b": 0.49,
    "qwen2.5-1.5b": 1.54,
    "qwen2.5-3b": 3.09,
    "qwen2.5-7b": 7.62,
    "qwen2.5-14b": 14.7,
    "qwen2.5-32b": 32.8,
    "qwen2.5-72b": 72.7,
}
REL_TOL = 0.01


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _rope(cfg) -> dict:
    """rope theta/type/factors whichever way this transformers stores them (4.x or 5.x)."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", None))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def _odd(n: int) -> int:
    while n % 2 == 0:
        n //= 2
    return n


# ---------------------------------------------------------------------------- files and index
def test_index_covers_every_file_and_counts_agree():
    files = {p.name for p in CONFIG_DIR.glob("*.json")} - {"index.json"}
    index = json.loads((CONFIG_DIR / "index.json").read_text())
    assert {e["file"] for e in index.values()} == files
    assert set(index) == set(PUBLISHED_B)
    for name, entry in index.items():
        assert entry["file"] == entry["hub_id"].replace("/", "--") + ".json"
        assert entry["params"] == param_count(load_bundled_config(name))
        assert entry["params_b"] == round(entry["params"] / 1e9, 2)


@pytest.mark.parametrize("name", NAMES)
def test_loads_offline_with_published_values(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    raw = load_bundled_dict(name)
    cfg = load_bundled_config(name)
    assert cfg.model_type == raw["model_type"]
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "tie_word_embeddings",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert getattr(cfg, key) == raw[key], key
    assert _head_dim(cfg) == raw.get("head_dim", raw["hidden_size"] // raw["num_attention_heads"])
    rope = _rope(cfg)
    assert rope["rope_theta"] == raw["rope_theta"]
    published_scaling = raw.get("rope_scaling") or {"rope_type": "default"}
    for key, value in published_scaling.items():
        assert rope[key] == value, key
    # the same config under its hub id
    hub_id = bundled_hub_id(name)
    assert load_bundled_config(hub_id).to_dict() == cfg.to_dict()
    assert cfg.name_or_path == hub_id


def test_unknown_name_lists_the_bundled_ones():
    with pytest.raises(ConfigError, match="qwen2.5-7b"):
        load_bundled_config("llama-9b")


def test_family_specifics_as_published():
    nemo = load_bundled_config("mistral-nemo-12b")
    assert (nemo.hidden_size, nemo.num_attention_heads, nemo.head_dim) == (5120, 32, 128)
    assert _rope(load_bundled_config("llama-3.1-8b"))["factor"] == 8.0
    assert _rope(load_bundled_config("llama-3.2-1b"))["factor"] == 32.0
    assert _rope(load_bundled_config("llama-3-8b"))["rope_type"] == "default"
    tied = {n for n in NAMES if load_bundled_config(n).tie_word_embeddings}
    assert tied == {"llama-3.2-1b", "llama-3.2-3b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b"}
    for n in NAMES:
        raw = load_bundled_dict(n)
        if raw["model_type"] == "qwen2":
            assert raw["use_sliding_window"] is False and raw["sliding_window"] is not None


# ---------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", NAMES)
def test_param_count_near_published_size(name):
    n = param_count(load_bundled_config(name))
    assert abs(n / 1e9 - PUBLISHED_B[name]) <= REL_TOL * PUBLISHED_B[name], n


def test_param_count_exact_where_the_exact_total_is_known():
    # Meta-Llama-3-8B: model.safetensors.index.json total_size 16,060,522,496 bytes of bf16 / 2.
    assert param_count(load_bundled_config("llama-3-8b")) == 8_030_261_248
    # Qwen2.5-0.5B: torchinfo of the real model, embedding 136,134,656 + 24 x 14,912,384 per
    # decoder layer + 896 final norm (lm_head tied).
    assert param_count(load_bundled_config("qwen2.5-0.5b")) == 136_134_656 + 24 * 14_912_384 + 896


@pytest.mark.parametrize("name", NAMES)
def test_full_config_on_meta_device_matches_param_count(name):
    from transformers import AutoModelForCausalLM

    cfg = load_bundled_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == param_count(cfg)  # tied counted once
    attn = model.model.layers[0].self_attn
    hd = _head_dim(cfg)
    assert attn.q_proj.weight.shape == (cfg.num_attention_heads * hd, cfg.hidden_size)
    assert attn.k_proj.weight.shape == (cfg.num_key_value_heads * hd, cfg.hidden_size)
    assert (attn.q_proj.bias is not None) == (cfg.model_type == "qwen2")
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == cfg.tie_word_embeddings


# ---------------------------------------------------------------------------- tiny models
@pytest.mark.parametrize("name", NAMES)
def test_tiny_config_is_structurally_identical_and_runs(name):
    from transformers import AutoModelForCausalLM

    full = load_bundled_config(name)
    tiny = tiny_config(full)
    H, I_, hd = full.hidden_size, full.intermediate_size, _head_dim(full)
    Ht, It, hdt = tiny.hidden_size, tiny.intermediate_size, _head_dim(tiny)
    # kept exactly
    assert tiny.model_type == full.model_type
    assert (tiny.num_attention_heads, tiny.num_key_value_heads) == (full.num_attention_heads, full.num_key_value_heads)
    assert tiny.tie_word_embeddings == full.tie_word_embeddings
    assert _rope(tiny) == _rope(full)
    assert tiny.rms_norm_eps == full.rms_norm_eps
    # widths: same odd factors, same ratios (integer cross-multiplication: exact)
    assert (_odd(Ht), _odd(It), _odd(hdt)) == (_odd(H), _odd(I_), _odd(hd))
    assert H * tiny.num_attention_heads * hdt == Ht * full.num_attention_heads * hd
    assert I_ * Ht == It * H
    assert hdt == 8 and tiny.num_hidden_layers == 2 and tiny.vocab_size == 512
    for key in ("bos_token_id", "eos_token_id"):
        assert 0 <= getattr(tiny, key) < tiny.vocab_size
    assert (tiny.bos_token_id == tiny.eos_token_id) == (full.bos_token_id == full.eos_token_id)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny).to(torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == param_count(tiny)
    assert (model.model.layers[0].self_attn.q_proj.bias is not None) == (full.model_type == "qwen2")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == full.tie_word_embeddings
    tokens = torch.tensor([[1, 5, 17, 300, 2, 511]])
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.shape == (1, 6, 512)
    assert torch.isfinite(logits).all()


def test_tiny_rule_worked_examples():
    qwen = load_bundled_config("qwen2.5-0.5b")
    t = tiny_config(qwen)  # scale 64/8 = 8
    assert (t.hidden_size, t.intermediate_size, _head_dim(t)) == (112, 608, 8)  # 28·4, 76·8
    t = tiny_config(qwen, scale=32)  # head_dim 2 (one RoPE pair): the smallest Qwen
    assert (t.hidden_size, t.intermediate_size, _head_dim(t)) == (28, 152, 2)
    nemo = tiny_config(load_bundled_config("mistral-nemo-12b"))
    assert (nemo.hidden_size, nemo.num_attention_heads, nemo.head_dim) == (320, 32, 8)  # 320 != 256
    t = tiny_config(load_bundled_config("qwen2.5-7b"))
    assert t.intermediate_size == 148 * 8  # the order-148 Hadamard base survives


@pytest.mark.parametrize("scale", [3, 64, 0])
def test_tiny_config_rejects_scales_that_break_the_shape(scale):
    with pytest.raises(ConfigError, match="scale"):
        tiny_config(load_bundled_config("qwen2.5-0.5b"), scale=scale)
