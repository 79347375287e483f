"""AttnCon column sums by the Triton kernels (rsq/kernels/triton_attention.py) against the
materialised-probability oracle in float64."""

import pytest
import torch

from rsq.importance import attention_received, attention_received_naive

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(
    "hq,hkv,t,d,causal",
    [
        (8, 2, 1, 64, True),
        (8, 2, 7, 64, True),
        (4, 4, 200, 128, True),
        (8, 2, 1000, 128, True),
        (8, 1, 333, 64, False),
        (32, 8, 2048, 128, True),
    ],
)
def test_triton_column_sums_match_naive(dtype, hq, hkv, t, d, causal):
    pytest.importorskip("triton")
    from rsq.kernels.triton_attention import attention_received_triton

    g = torch.Generator(device="cuda").manual_seed(t)
    q = (torch.randn(2, hq, t, d, device="cuda", generator=g) * 1.5).to(dtype)
    k = (torch.randn(2, hkv, t, d, device="cuda", generator=g) * 1.5).to(dtype)
    got = attention_received_triton(q, k, causal=causal)
    ref = attention_received_naive(q.double(), k.double(), causal=causal)  # the same rounded inputs
    # float32 logits (exact products of the half inputs, float32 sums over d) and exp2: ~1e-6
    # relative per probability; sums of up to Hq·T of them in float32: rtol 1e-4, plus an absolute
    # floor for keys that receive almost nothing
    assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-6 * hq), (got.double() - ref).abs().max()
    if causal:  # every query row sums to 1: Σ_j s_j = Hq·T exactly, to float32 rounding
        assert torch.allclose(
            got.sum(1).double(), torch.full((2,), float(hq * t), dtype=torch.float64, device="cuda"), rtol=1e-5
        )


def test_dispatch_uses_the_kernel_for_half_inputs(monkeypatch):
    pytest.importorskip("triton")
    import rsq.kernels.triton_attention as TA

    calls = []
    real = TA.attention_received_triton
    monkeypatch.setattr(TA, "attention_received_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q = torch.randn(1, 4, 64, 64, device="cuda").bfloat16()
    k = torch.randn(1, 2, 64, 64, device="cuda").bfloat16()
    fast = attention_received(q, k)
    assert calls and torch.allclose(fast.double(), attention_received_naive(q.double(), k.double()), rtol=1e-4)
    attention_received(q.float(), k.float())  # float32 stays on the torch path
    assert len(calls) == 1
