"""E8P decode kernels and the online Hadamard kernel against their torch references (GPU only;
skipped without CUDA or Triton).

Oracles: E8P — rsq.quant.e8p.e8p_decode (the codebook by its definition) times the scale, x @ W^T
in float32; tolerance: relative Frobenius error <= 1e-2 (bf16 outputs, 2^-9 per element, and
float32 accumulation order). Hadamard — rsq.rotation.hadamard.hadamard_transform in float32;
every element within one bf16/fp16 ulp of it (2^-7 relative: rounding of a result that is exact to
~2^-16 before the final cast), plus a relative Frobenius error <= 4e-3.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

import rsq.formats.e8p  # noqa: E402, F401  (registers the E8P kernel backends)
from rsq.kernels.backends import Layer, run_backend, select_backend  # noqa: E402
from rsq.quant.e8p import codes_to_int16, e8p_decode  # noqa: E402
from rsq.rotation.hadamard import hadamard_transform  # noqa: E402

LLAMA = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]


def _e8p(n, k, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    codes = codes_to_int16(torch.randint(0, 1 << 16, (n, k // 8), device="cuda", generator=g))
    scale = torch.tensor([[0.013]], device="cuda")
    w = e8p_decode(codes.reshape(-1)).reshape(n, k) * scale
    return codes, scale, w


@pytest.mark.parametrize(
    "n,k,dtype", [(n, k, torch.bfloat16) for n, k in LLAMA] + [(72, 136, torch.bfloat16), (72, 136, torch.float16)]
)
@pytest.mark.parametrize("m", [1, 3, 16, 40, 300])
def test_e8p_matmul_matches_reference(n, k, m, dtype):
    from rsq.kernels import triton_e8p as T

    codes, scale, w = _e8p(n, k, n + k + m)
    bias = torch.randn(n, device="cuda").to(dtype)
    x = torch.randn(m, k, device="cuda").to(dtype)
    ref = x.float() @ w.T + bias.float()
    fns = {
        "dispatch": lambda x, c, s, b: run_backend(x, (c, s), b, Layer("e8p", 2, -1, k, n)),
        "dequant_mm": T.dequant_matmul,
    }
    if m == 1:
        fns["gemv"] = T.gemv
    if m <= 64:
        fns["small"] = T.matmul_small
    for name, fn in fns.items():
        y = fn(x, codes, scale, bias)
        assert y.dtype == dtype and y.shape == ref.shape and torch.isfinite(y).all(), name
        rel = ((y.float() - ref).norm() / ref.norm()).item()
        assert rel <= 1e-2, f"{name} M={m} {n}x{k}: relative error {rel:.2e}"


def test_e8p_dequantize_is_exact():
    from rsq.kernels import triton_e8p as T

    codes, scale, w = _e8p(256, 512, 0)
    assert torch.equal(T.dequantize(codes, scale, torch.float32), w)  # multiples of 1/4 times one scale


def test_e8p_linear_uses_the_kernel_and_matches_reference():
    from rsq.formats.e8p import E8PLinear

    lin = E8PLinear(512, 256, bias=False).cuda()
    lin.codes.copy_(_e8p(256, 512, 1)[0])
    x = torch.randn(2, 5, 512, device="cuda", dtype=torch.bfloat16)
    assert select_backend(x, lin).name == "triton_e8p_small"
    for m, name in ((1, "triton_e8p_gemv"), (65, "triton_e8p_dequant_mm")):
        assert select_backend(torch.randn(m, 512, device="cuda", dtype=torch.bfloat16), lin).name == name
    ref = x.float() @ lin.dequantize_weight().T
    y = lin(x)
    assert ((y.float() - ref).norm() / ref.norm()).item() <= 1e-2


def _check_hadamard(y, ref):
    assert torch.isfinite(y).all()
    err = (y.float() - ref).abs()
    # one output ulp (2^-7 relative) + the hi/lo split's ~2^-16 of the row scale near zeros
    assert (err <= 2**-7 * ref.abs() + 2**-13 * ref.abs().max()).all(), f"max error {err.max().item():.3e}"
    assert ((y.float() - ref).norm() / ref.norm()).item() <= 4e-3


@pytest.mark.parametrize("n", [4096, 14336, 1536, 8192, 256, 12288])
@pytest.mark.parametrize("m", [1, 7, 2048])
def test_hadamard_full_matches_reference(n, m):
    _full(n, m, torch.bfloat16)


@pytest.mark.parametrize("n", [4096, 14336])
def test_hadamard_full_fp16(n):
    _full(n, 33, torch.float16)


def _full(n, m, dtype):
    from rsq.kernels import triton_hadamard as TH

    assert TH.factors(n) is not None
    x = (torch.randn(m, n, device="cuda") * 3).to(dtype)
    y = TH.hadamard(x, n)
    _check_hadamard(y, hadamard_transform(x.float(), n))


@pytest.mark.parametrize("heads,hd", [(32, 128), (12, 64), (28, 128)])
def test_hadamard_cross_head_matches_reference(heads, hd):
    from rsq.kernels import triton_hadamard as TH

    x = torch.randn(5, heads * hd, device="cuda", dtype=torch.bfloat16)
    y = TH.hadamard(x, heads, cross_head=True, head_dim=hd)
    ref = hadamard_transform(x.float().reshape(5, heads, hd).transpose(1, 2), heads)
    _check_hadamard(y, ref.transpose(1, 2).reshape(5, -1))


@pytest.mark.parametrize("width,block", [(14336, 2048), (4864, 256), (9216, 1024), (1536, 512), (8960, 256)])
@pytest.mark.parametrize("m", [1, 40])
def test_block_hadamard_runs_the_kernel_per_block(width, block, m, monkeypatch):
    """The ``block`` kind (export's down_proj rotation) on CUDA: the kernel on x viewed as
    (-1, block), against the torch block transform in float32; the torch path is not called."""
    from rsq.kernels import hadamard as KH
    from rsq.rotation.hadamard import block_hadamard_transform

    x = (torch.randn(3, m, width, device="cuda") * 3).to(torch.bfloat16)
    ref = block_hadamard_transform(x.float(), block)
    monkeypatch.setattr(KH, "block_hadamard_transform", lambda *a: pytest.fail("took the torch path"))
    y = KH.hadamard_rotate(x, "block", width, block)
    assert y.shape == x.shape and y.dtype == x.dtype
    _check_hadamard(y.reshape(-1, width), ref.reshape(-1, width))


def test_online_rotation_module_uses_the_kernel():
    from rsq.rotation.online import OnlineRotation, OnlineRotationModule

    mod = OnlineRotationModule(OnlineRotation("mlp.down_proj", "full", 14336))
    x = torch.randn(3, 14336, device="cuda", dtype=torch.bfloat16)
    _check_hadamard(mod(x), hadamard_transform(x.float(), 14336))


def test_e8p_compiled_one_token_step_after_eager_prefill():
    """The decode order of rsq's loop and of transformers' compiled generate: an eager prefill (M > 1:
    the tile kernels) and then a step of one token compiled with CUDA graphs (the GEMV). The GEMV's
    codebook table must already exist then: first built inside CUDA-graph trees' warm-up it would sit
    in the graph's private pool, untracked, and the step fails (bench/generate_speed.py --formats e8p
    did, session 18). Oracle: the float32 product with the decoded weights, relative error <= 1e-2."""
    from rsq.formats.e8p import E8PLinear
    from rsq.kernels import triton_e8p as T

    n, k = 256, 512
    codes, scale, w = _e8p(n, k, 7)
    layer = E8PLinear(k, n, bias=False).cuda()
    layer.codes.copy_(codes)
    layer.scales.copy_(scale)
    T.device_tables.cache_clear()
    torch._dynamo.reset()
    with torch.no_grad():
        layer(torch.randn(3, k, device="cuda").bfloat16())  # the eager "prefill"
        step = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
        x = torch.randn(1, k, device="cuda").bfloat16()
        for _ in range(4):  # warm-up, recording, replays
            torch.compiler.cudagraph_mark_step_begin()
            y = step(x).clone()
    ref = x.float() @ w.T
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel <= 1e-2, f"relative error {rel:.2e}"
