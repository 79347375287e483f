"""The real embedded model (SmolLM2-135M-Instruct) with a small calibration set.

Slow-ish (a few minutes on 2 cores) but part of the default suite: it is the one check that the
whole method works on a real network and real text."""

import copy

import pytest
import torch

from rsq.calib.datasets import eval_windows, load_text, sample_windows, tokenize
from rsq.config import RotationConfig, RSQConfig
from rsq.eval.perplexity import perplexity
from rsq.io.loading import load_model
from rsq.job.loop import quantize_layers
from rsq.models.registry import resolve

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    model, tok = load_model(None, torch.float32)
    text = load_text("wikitext2")
    calib = sample_windows(tokenize(tok, text.calib), 8, 256, seed=0)
    evalw = eval_windows(tokenize(tok, text.eval), 256, 6)
    return model, calib, evalw


def _ppl(model, windows):
    return perplexity(model, windows, torch.device("cpu"))


def _quantized(smol, method):
    model, calib, _ = smol
    m = copy.deepcopy(model)
    cfg = RSQConfig.for_method(method, grid={"bits": 3}, calib={"nsamples": 8, "seqlen": 256}, device="cpu")
    if method in ("quarot", "rsq"):
        from rsq.rotation import rotate_model

        rotate_model(m, resolve(m), RotationConfig(enabled=True))
    quantize_layers(m, cfg, calib)
    return m


def test_fp_gptq_rtn_ordering(smol):
    fp = _ppl(smol[0], smol[2])
    gptq = _ppl(_quantized(smol, "gptq"), smol[2])
    rtn = _ppl(_quantized(smol, "rtn"), smol[2])
    # reference figures (40x512 windows): fp 29.1, gptq 462, rtn 1753 at 3 bits per channel
    assert 15 < fp < 40
    assert fp < gptq < rtn, (fp, gptq, rtn)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rotation_preserves_smollm2_logits(smol, dtype):
    """The real model's rotation with --online-rotations exact (R1 of order 576 = 36·16, online
    down_proj Hadamard of order 1536 = 12·128, per-head V of order 64; 9 heads, so no cross-head
    part) keeps its logits."""
    from rsq.rotation import rotate_model
    from tests.integration.test_rotation import _exact_norms

    model, _, evalw = smol
    ids = evalw[:1, :128]
    ref_model = copy.deepcopy(model).to(dtype)
    rot_model = copy.deepcopy(model).to(dtype)
    record = rotate_model(rot_model, resolve(rot_model), RotationConfig(enabled=True, online="exact"))
    if dtype == torch.float64:
        # HF's RMSNorm computes in float32 even in a float64 model: run every norm in float64 in
        # both models alike, so only float64 rounding of O(depth x width) products remains
        _exact_norms(ref_model), _exact_norms(rot_model)
    with torch.no_grad():
        ref = ref_model(input_ids=ids).logits
        out = rot_model(input_ids=ids).logits
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"SmolLM2 rotation {dtype}: max|dlogit| {(out - ref).abs().max().item():.3g}, relative {rel:.3g}")
    # float64: the bound is 1e-6 relative; we see ~1e-14, so 1e-10 leaves room for BLAS order.
    # float32: the rotated weights are rounded to float32 once and 30 layers compound it (~4e-6 seen).
    assert rel < (1e-10 if dtype == torch.float64 else 1e-4), record
