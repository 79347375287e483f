"""Calibration passes that reuse the attention output (rsq.calib.blockpass) against full layer passes."""

import dataclasses
import logging

import pytest
import torch

from rsq.config import CalibConfig, ImportanceConfig, RotationConfig, RSQConfig
from rsq.importance.layer import make_weight_fn
from rsq.job.loop import quantize_layers
from rsq.models.registry import resolve
from tests.conftest import tiny_model


def _run(family, reuse: bool, adapter_change=None, rotate=False, dtype=torch.float32, prepare=None):
    model = tiny_model(family, dtype=dtype)
    if prepare is not None:
        prepare(model)
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():  # norms with random weights: a wrong norm shows
        if "norm" in name:
            p.data = (1 + 0.5 * torch.randn(p.shape, generator=g)).to(dtype)
    adapter = resolve(model)
    if rotate:
        from rsq.rotation import rotate_model

        rotate_model(model, adapter, RotationConfig(enabled=True))
    adapter = dataclasses.replace(adapter, prenorm_residual=reuse, **(adapter_change or {}))
    windows = torch.randint(0, 512, (5, 32), generator=torch.Generator().manual_seed(0))
    cfg = RSQConfig(
        method="rsq",
        importance=ImportanceConfig(strategy="attncon"),
        calib=CalibConfig(nsamples=5, seqlen=32),
        batch_size=2,
        device="cpu",
    )
    state = quantize_layers(
        model, cfg, windows, adapter=adapter, weight_fn=make_weight_fn(cfg, adapter, model.config, windows)
    )
    return state, model


@pytest.mark.parametrize("keep_down", ["all", "part", "none"])
@pytest.mark.parametrize("family,rotate", [("llama", False), ("llama", True), ("qwen2", True)])
def test_reused_attention_gives_the_same_codes(family, rotate, keep_down, monkeypatch):
    """Same modules, same order: the codes of every linear are identical to full layer passes (the
    rotated llama has an online Hadamard before down_proj, which the MLP-only passes must apply),
    with the down_proj inputs kept for the propagation (all of them, or the first batch only: the
    budget holds 3 of the 5 sequences, rounded down to the batch size 2) or recomputed."""
    import rsq.calib.blockpass as bp
    import rsq.job.stages as stages

    inter = tiny_model(family).config.intermediate_size
    budget = {"all": stages.DOWN_CACHE_HOST_BYTES, "part": 3 * 32 * inter * 4, "none": 0}[keep_down]
    monkeypatch.setattr(stages, "DOWN_CACHE_HOST_BYTES", budget)
    kept = []
    real_cache = stages._down_cache
    monkeypatch.setattr(stages, "_down_cache", lambda *a: kept.append(real_cache(*a)) or kept[-1])

    calls = []
    real = bp.layer_forward
    monkeypatch.setattr(bp, "layer_forward", lambda *a: calls.append(1) or real(*a))
    fast, _ = _run(family, True, rotate=rotate)
    # whole-layer forwards: only the first-use check of the output (1 batch), not 2 layers x 3 batches
    assert len(calls) == 1
    assert [None if c is None else len(c) for c in kept] == [{"all": 5, "part": 2, "none": None}[keep_down]]
    full, _ = _run(family, False, rotate=rotate)
    assert fast.results.keys() == full.results.keys()
    for k in full.results:
        assert torch.equal(fast.results[k].codes, full.results[k].codes), k
        assert torch.equal(fast.results[k].scale, full.results[k].scale), k


def test_a_block_of_another_form_falls_back(caplog):
    """An adapter whose block is not what it claims (here the MLP's norm named as the attention's,
    so the shared-work MLP input is wrong) is caught by the first-use check: warning, then full
    passes, and the same codes as full passes from the start."""
    change = {"mlp_norm": "input_layernorm"}
    with caplog.at_level(logging.WARNING, logger="rsq.calib.blockpass"):
        fast, _ = _run("llama", True, change)
    assert "not a pre-norm residual block" in caplog.text
    full, _ = _run("llama", False, change)
    for k in full.results:
        assert torch.equal(fast.results[k].codes, full.results[k].codes), k


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_every_group_hessian_and_output_equals_full_passes(family, monkeypatch):
    """The shared-work passes (attention output, residual and down_proj inputs kept between the
    passes) against full layer passes: every group's Hessian of every layer bit for bit (tolerance
    0: the same float operations on the same inputs), the same codes and the same propagated
    activations (the final layer's output: the model's weights after the run are its W_hat); and
    the gate/up products run once per batch per layer (the down pass), not again in propagation."""
    from rsq.solver.hessian import HessianAccumulator

    finalize = HessianAccumulator.finalize

    def run(reuse):
        hessians, gate_calls = [], []
        monkeypatch.setattr(
            HessianAccumulator, "finalize", lambda self: hessians.append(finalize(self)) or hessians[-1]
        )

        def count_gate_calls(model):
            for layer in model.model.layers:
                layer.mlp.gate_proj.register_forward_hook(lambda *_: gate_calls.append(1))

        state, model = _run(family, reuse, prepare=count_gate_calls)
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))
        return hessians, state, model(input_ids=ids).logits, len(gate_calls)

    fast_h, fast, fast_logits, fast_gates = run(True)
    full_h, full, full_logits, full_gates = run(False)
    assert len(fast_h) == len(full_h) == 2 * 4  # 2 layers x 4 groups
    for i, (a, b) in enumerate(zip(fast_h, full_h)):
        assert torch.equal(a, b), f"Hessian {i}"
    for k in full.results:
        assert torch.equal(fast.results[k].codes, full.results[k].codes), k
    assert torch.equal(fast_logits, full_logits)
    # 5 windows in batches of 2 = 3 batches a layer: gate_proj runs in the down pass only (the MLP-in
    # pass stops before it), plus the first-use check of the output (1) and the logits (1 a layer);
    # full passes run it again in the propagation (3 more a layer)
    assert full_gates == 2 * (3 + 3) + 2
    o_proj = tiny_model(family).model.layers[0].self_attn.o_proj
    if o_proj.in_features == o_proj.out_features:
        assert fast_gates == 2 * 3 + 2 + 1
    else:  # the tiny mistral's heads x head_dim is not its width: no shared buffer, full passes
        assert fast_gates == full_gates


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_group_pass_stops_before_any_member_runs(family):
    """forward_until on a group stops at whichever member the layer calls first: none of them runs
    (Llama's attention calls q before k; its MLP gate before up), and the input it hands over is the
    one each member receives in the layer's own forward (the oracle: forward hooks of a full pass)."""
    from rsq.calib.capture import forward_until, layer_forward

    model = tiny_model(family)
    layer, adapter = model.model.layers[0], resolve(model)
    x = torch.randn(2, 8, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(8)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(x, pos), "position_ids": pos}
    seen, ran = {}, []
    hooks = []
    for name in adapter.linears:
        m = layer.get_submodule(name)
        hooks.append(m.register_forward_hook(lambda mod, args, out, name=name: seen.update({name: args[0]})))
    layer_forward(layer, x, kwargs)
    for h in hooks:
        h.remove()
    for group in (adapter.groups[0], adapter.groups[2]):
        members = tuple(layer.get_submodule(n) for n in group)
        hooks = [m.register_forward_hook(lambda *_, n=n: ran.append(n)) for n, m in zip(group, members)]
        got = []
        forward_until(layer, members, x, kwargs, got.append)
        for h in hooks:
            h.remove()
        assert ran == [], group
        for name in group:
            assert torch.equal(got[0], seen[name]), name
