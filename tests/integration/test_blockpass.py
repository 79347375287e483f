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


def _run(family, reuse: bool, adapter_change=None, rotate=False, dtype=torch.float32):
    model = tiny_model(family, dtype=dtype)
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


@pytest.mark.parametrize("family,rotate", [("llama", False), ("llama", True), ("qwen2", True)])
def test_reused_attention_gives_the_same_codes(family, rotate, monkeypatch):
    """Same modules, same order: the codes of every linear are identical to full layer passes (the
    rotated llama has an online Hadamard before down_proj, which the MLP-only passes must apply)."""
    import rsq.calib.blockpass as bp

    calls = []
    real = bp.layer_forward
    monkeypatch.setattr(bp, "layer_forward", lambda *a: calls.append(1) or real(*a))
    fast, _ = _run(family, True, rotate=rotate)
    # whole-layer forwards: only the first-use check of the output (1 batch), not 2 layers x 3 batches
    assert len(calls) == 1
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
