"""Every Triton path against rsq/kernels/reference.py (GPU only; skipped without CUDA or Triton).

Oracle: the reference computes W_hat = s (q - z) and x @ W_hat^T in float32 from the same packed
buffers and bf16/fp16 inputs. Tolerance: relative Frobenius error <= 1e-2, because the kernels' outputs
are rounded to bf16 (2^-9 relative per element), their weight tiles are rounded to bf16 where the
tensor cores consume them, and float32 accumulation order differs.
Fast: run with ``-n 8`` (pytest-xdist) to spread Triton compilation over processes.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from rsq.formats.uniform import QuantLinear  # noqa: E402
from rsq.kernels import reference, select_backend  # noqa: E402
from rsq.quant.pack import pack_codes  # noqa: E402

TOL = 1e-2
LLAMA = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]  # (out, in)


def make_weight(n, k, bits, group_size, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 1 << bits, (n, k), device="cuda", generator=g, dtype=torch.uint8)
    scales = (torch.rand(n, groups, device="cuda", generator=g) * 0.02 + 1e-3).to(dtype)
    zeros = torch.randint(0, 1 << bits, (n, groups), device="cuda", generator=g, dtype=torch.uint8)
    bias = torch.randn(n, device="cuda", generator=g).to(dtype)
    return pack_codes(codes, bits), scales, zeros, bias


def kernels():
    from rsq.kernels import triton_wq as T

    return {
        "gemv": T.gemv,
        "small": T.matmul_small,
        "large": T.matmul_large,
        "dequant_mm": T.dequant_matmul,
    }


def check(name, m, weight, bits, k, group_size, bias=True, dtype=torch.bfloat16):
    qw, s, z, b = weight
    b = b if bias else None
    x = torch.randn(m, k, device="cuda").to(dtype)
    torch.full((m, qw.shape[0]), float("nan"), device="cuda")  # freed: poisons what empty() reuses
    y = kernels()[name](x, qw, s, z, b, bits=bits, in_features=k, group_size=group_size)
    ref = reference.wq_matmul(x.float(), qw, s, z, b, bits=bits, in_features=k, group_size=group_size)
    assert y.shape == ref.shape and y.dtype == dtype
    assert torch.isfinite(y).all(), f"{name}: unwritten or non-finite outputs"
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel <= TOL, f"{name} M={m} bits={bits} group={group_size}: relative error {rel:.2e}"


@pytest.mark.parametrize("n,k", LLAMA)
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 128])
def test_llama_shapes_decode(n, k, bits, group_size):
    weight = make_weight(n, k, bits, group_size, seed=n + k + bits)
    for m in (1, 4):
        check("gemv", m, weight, bits, k, group_size)
    for m in (1, 4, 16):
        check("small", m, weight, bits, k, group_size)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 128])
def test_prefill(bits, group_size):
    weight = make_weight(1024, 4096, bits, group_size, seed=bits)
    for name in ("large", "dequant_mm"):
        check(name, 200, weight, bits, 4096, group_size)


@pytest.mark.parametrize(
    "n,k,bits,group_size",
    [
        (40, 96, 3, -1),
        (33, 160, 3, 32),
        (100, 100, 4, -1),
        (7, 64, 2, 32),
        (65, 72, 8, -1),
        (48, 256, 8, 64),
        (130, 384, 4, 64),
        (17, 1000, 2, -1),
        (24, 320, 4, 32),
    ],
)
def test_odd_shapes(n, k, bits, group_size):
    weight = make_weight(n, k, bits, group_size, seed=n * k)
    for m in (1, 3, 8):
        check("gemv", m, weight, bits, k, group_size, bias=m != 3)
    for m in (1, 5, 16, 40):
        check("small", m, weight, bits, k, group_size, bias=m != 5)
    for name in ("large", "dequant_mm"):
        check(name, 70, weight, bits, k, group_size)


def test_float16_activations():
    weight = make_weight(512, 1024, 4, 128, dtype=torch.float16)
    for name, m in (("gemv", 1), ("small", 16), ("large", 96), ("dequant_mm", 96)):
        check(name, m, weight, 4, 1024, 128, dtype=torch.float16)


def test_large_activations_stay_finite():
    """gemv scales x by up to 2^85 internally: activations up to ~1e4 must stay exact."""
    qw, s, z, b = make_weight(256, 512, 4, -1)
    x = torch.randn(1, 512, device="cuda").bfloat16() * 1e4
    ref = reference.wq_matmul(x.float(), qw, s, z, b, bits=4, in_features=512, group_size=-1)
    y = kernels()["gemv"](x, qw, s, z, b, bits=4, in_features=512, group_size=-1)
    assert ((y.float() - ref).norm() / ref.norm()).item() <= TOL


def test_quantlinear_dispatch_on_gpu():
    codes = torch.randint(0, 8, (384, 512), device="cuda", dtype=torch.uint8)
    scale = torch.rand(384, 4, device="cuda") * 0.01 + 1e-3
    zero = torch.full((384, 4), 4.0, device="cuda")
    layer = QuantLinear.from_codes(codes, scale, zero, 3, 128, bias=torch.randn(384, device="cuda"))
    w = layer.dequantize_weight()
    # with humming-kernels installed it runs 2+ tokens (tests/kernels/test_humming_backend.py)
    hum = importlib.util.find_spec("humming") is not None
    for shape, expected in (
        ((1, 512), "triton_gemv"),
        ((2, 2, 512), "humming" if hum else "triton_gemv"),
        ((2, 3, 512), "humming" if hum else "triton_small"),
        ((300, 512), "humming" if hum else "triton_dequant_mm"),
    ):
        x = torch.randn(*shape, device="cuda").bfloat16()
        assert select_backend(x, layer).name == expected
        y = layer(x)
        ref = x.float() @ w.t() + layer.bias.float()
        assert y.shape == (*shape[:-1], 384)
        assert ((y.float() - ref).norm() / ref.norm()).item() <= TOL
    layer.backend = "reference"
    assert select_backend(torch.randn(1, 512, device="cuda").bfloat16(), layer, "reference").name == "reference"
