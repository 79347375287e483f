"""The humming backend (rsq/kernels/humming_backend.py) against rsq/kernels/reference.py (GPU only;
skipped without CUDA, Triton or humming-kernels).

Oracle: the reference computes W_hat = s (q - z) and x @ W_hat^T in float32 from the same packed
buffers. The codes humming runs are rsq's own (copied, not requantized), so the only differences are
bf16 rounding of the output (2^-9 relative per element) and of the tensor cores' operands, and the
accumulation order: relative Frobenius error <= 1e-2, as for rsq's Triton kernels.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("humming")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from rsq.formats.uniform import QuantLinear  # noqa: E402
from rsq.kernels import humming_backend as H  # noqa: E402
from rsq.kernels import reference, select_backend  # noqa: E402
from rsq.quant.pack import pack_codes  # noqa: E402

TOL = 1e-2


def make_weight(n, k, bits, group_size, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 1 << bits, (n, k), device="cuda", generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, device="cuda", generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    zeros = torch.randint(0, 1 << bits, (n, groups), device="cuda", generator=g, dtype=torch.uint8)
    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    return pack_codes(codes, bits), scales, zeros, bias


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [-1, 128])
@pytest.mark.parametrize("n,k", [(1024, 4096), (4096, 1024)])
def test_humming_matches_reference(bits, group_size, n, k):
    qw, s, z, b = make_weight(n, k, bits, group_size, seed=bits * 7 + n)
    kw = dict(bits=bits, in_features=k, group_size=group_size)
    assert H.layer_for(qw, s, z, b, **kw) is not None, "humming did not build (or failed its probe)"
    for m in (2, 16, 64, 300):
        x = torch.randn(m, k, device="cuda").bfloat16()
        y = H.matmul(x, qw, s, z, b, **kw)
        ref = reference.wq_matmul(x.float(), qw, s, z, b, **kw)
        assert y.shape == ref.shape and y.dtype == torch.bfloat16
        assert torch.isfinite(y).all()
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        assert rel <= TOL, f"M={m} bits={bits} group={group_size}: relative error {rel:.2e}"
    H.clear_cache()


@pytest.mark.parametrize("bits", [2, 8])
def test_other_widths_match_reference(bits):
    """2 and 8 bits: humming if it builds them, else the Triton fallback: the same function either way."""
    qw, s, z, b = make_weight(1024, 4096, bits, -1, seed=bits)
    kw = dict(bits=bits, in_features=4096, group_size=-1)
    for m in (2, 64):
        x = torch.randn(m, 4096, device="cuda").bfloat16()
        ref = reference.wq_matmul(x.float(), qw, s, z, b, **kw)
        y = H.matmul(x, qw, s, z, b, **kw)
        assert ((y.float() - ref).norm() / ref.norm()).item() <= TOL
    H.clear_cache()


def test_dispatch_picks_humming_for_two_tokens_and_more():
    codes = torch.randint(0, 8, (1024, 4096), device="cuda", dtype=torch.uint8)
    scale = torch.rand(1024, 1, device="cuda") * 0.01 + 1e-3
    zero = torch.full((1024, 1), 4.0, device="cuda")
    layer = QuantLinear.from_codes(codes, scale, zero, 3, -1)
    w = layer.dequantize_weight()
    assert select_backend(torch.randn(1, 4096, device="cuda").bfloat16(), layer).name == "triton_gemv"
    for m in (2, 16, 2048):
        x = torch.randn(m, 4096, device="cuda").bfloat16()
        assert select_backend(x, layer).name == "humming"
        y = layer(x)
        ref = x.float() @ w.t()
        assert ((y.float() - ref).norm() / ref.norm()).item() <= TOL
    H.clear_cache()
