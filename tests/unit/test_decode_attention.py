"""Decode attention over the unrepeated K/V heads (rsq/generation/attention.py), CPU.

Oracles: transformers' ``eager`` attention (explicit matmul + softmax over repeated K/V) for one
decode step's logits, and rsq's loop without the packed path for the greedy tokens. Tolerance of
the logits: 1e-5 of their largest magnitude (float32; SDPA's math path and the eager matmuls sum
in other orders: observed ~3e-6 on logits of magnitude ~4, for transformers' own sdpa as for this).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rsq.generation import LoopOptions, attention, decoder, generate
from tests.conftest import tiny_model

PROMPT = 7


def _model(family: str):
    m = tiny_model(family)
    gen = torch.Generator().manual_seed(0)
    for p in m.parameters():
        if p.dim() == 2:
            p.data.normal_(0, 0.15, generator=gen)
    return m


def _ids(batch: int = 3) -> torch.Tensor:
    return torch.randint(3, 512, (batch, PROMPT), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_one_decode_step_equals_eager_attention(family):
    from transformers import StaticCache

    from rsq.generation.loop import _forward_names

    model, ids = _model(family), _ids()
    batch = ids.shape[0]
    name = _forward_names(model)[0]  # the forward's keyword for the cache
    logits = {}
    with torch.no_grad():
        for impl in ("eager", "packed"):
            model.config._attn_implementation = "eager" if impl == "eager" else "sdpa"
            cache = StaticCache(config=model.config, max_cache_len=32)
            with attention.use(model, impl == "packed") as on:
                assert on == (impl == "packed")
                assert model.config._attn_implementation == ("eager" if impl == "eager" else attention.NAME)
                pos = torch.arange(PROMPT)
                model(input_ids=ids, position_ids=pos.expand(batch, -1), cache_position=pos, **{name: cache})
                step = dict(position_ids=torch.full((batch, 1), PROMPT), cache_position=torch.tensor([PROMPT]))
                logits[impl] = model(input_ids=ids[:, :1], **step, **{name: cache}).logits
    assert model.config._attn_implementation == "sdpa"  # restored after the block
    ref = logits["eager"]
    assert (logits["packed"] - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.parametrize("packed", [True, False])
def test_compiled_step_attends_over_the_unrepeated_cache(packed):
    """The compiled decode step (fullgraph): with the packed path each SDPA call takes the query as
    (batch, kv_heads, n_rep, head_dim) and the cache's own (batch, kv_heads, L, head_dim) K/V;
    without it, transformers repeats K/V to every query head. Greedy tokens equal either way."""
    model, ids = _model("llama"), _ids()
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    ref = generate(model, ids, 12, eos_token_id=(), options=LoopOptions(packed_gqa=False))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    options = LoopOptions(compile=True, backend=backend, packed_gqa=packed)
    got = generate(model, ids, 12, eos_token_id=(), options=options)
    assert decoder(model).stats["packed_gqa"] is packed and not decoder(model).graph_breaks
    assert torch.equal(got, ref)
    assert len(graphs) == 1
    sdpa = [n for n in graphs[0].graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(sdpa) == model.config.num_hidden_layers
    for node in sdpa:
        q, k = (a.meta["example_value"].shape for a in node.args[:2])
        if packed:
            assert tuple(q) == (3, kv, heads // kv, 16) and tuple(k)[:2] == (3, kv)
        else:
            assert tuple(q) == (3, heads, 1, 16) and tuple(k)[:2] == (3, heads)
    torch._dynamo.reset()


def test_models_without_grouped_heads_are_left_alone():
    model = _model("llama")
    model.config.num_key_value_heads = model.config.num_attention_heads  # (only read, never run)
    with attention.use(model) as on:
        assert not on and model.config._attn_implementation == "sdpa"
    assert not attention.applies(torch.nn.Linear(2, 2))


def test_prefill_and_masks_per_head_fall_back_to_transformers_sdpa():
    """More than one query token: transformers' sdpa function, called with the same arguments."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 5, 8, generator=gen) for h in (4, 2, 2))
    attention.register()
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
    got, _ = attention.decode_attention(module, q, k, v, None, scaling=0.3)
    assert torch.equal(got, want)
    # one token, a mask per head: also transformers'
    q1, mask = q[:, :, :1], torch.rand(2, 4, 1, 5, generator=gen) > 0.3
    mask[..., 0] = True
    want, _ = sdpa_attention_forward(module, q1, k, v, mask, scaling=0.3)
    got, _ = attention.decode_attention(module, q1, k, v, mask, scaling=0.3)
    assert torch.equal(got, want)
