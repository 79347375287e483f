"""rsq's Triton kernels (uniform GEMV; E8P GEMV and tiles) on a CPU, in Triton's interpreter, against references.

Runs only where Triton is installed and ``TRITON_INTERPRET=1`` is set (the CPU machines have no GPU;
the GPU tests in test_triton_kernels.py cover the compiled kernels):

    TRITON_INTERPRET=1 python3 -m pytest -q tests/kernels/test_gemv_interpreter.py

(Triton 3.6's interpreter converts a one-element array with ``int()``, which NumPy 2.4 refuses for arrays
of ndim > 0: with NumPy >= 2.4 its ``__index__`` in triton/runtime/interpreter.py needs
``int(self.handle.data.reshape(-1)[0])``, which is how these tests were run.)

Oracle and tolerance as in test_triton_kernels.py: relative Frobenius error <= 1e-2 (outputs rounded
to bf16, 2^-9 relative per element; a wrong code position gives errors of order 1). Shapes cover per
channel and groups of 32/128, K a multiple of the tile (no column masks) and not (2080, 96), and 1
and 3 tokens.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")

from rsq.kernels import reference  # noqa: E402
from rsq.kernels import triton_wq as T  # noqa: E402
from rsq.quant.pack import pack_codes  # noqa: E402

CASES = [
    (bits, g, n, k, m)
    for bits, g, (n, k), m in itertools.product((2, 3, 4), (-1, 32, 128), ((40, 1024), (24, 2080), (8, 96)), (1, 3))
    if g == -1 or k % g == 0
]


@pytest.mark.parametrize("bits,group_size,n,k,m", CASES)
def test_gemv_matches_the_reference(bits, group_size, n, k, m):
    g = torch.Generator().manual_seed(n * k + bits)
    groups = 1 if group_size == -1 else k // group_size
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)
    s = (torch.rand(n, groups, generator=g) * 0.02 + 1e-3).to(torch.bfloat16)
    z = torch.randint(0, 1 << bits, (n, groups), dtype=torch.uint8, generator=g)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    qw = pack_codes(codes, bits)
    cfg = T.gemv_config(m, n, k, bits, group_size, sms=4)
    y = T.gemv(x, qw, s, z, b, bits=bits, in_features=k, group_size=group_size, config=cfg)
    ref = reference.wq_matmul(x.float(), qw, s, z, b, bits=bits, in_features=k, group_size=group_size)
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel <= 1e-2, f"gemv {bits}b g={group_size} {n}x{k} M={m}: relative error {rel:.2e}"


@pytest.mark.parametrize("n,k", [(40, 1024), (24, 2112), (9, 136)])
def test_e8p_gemv_matches_the_codebook(n, k):
    """The E8P one-token GEMV (rsq/kernels/triton_e8p.py) against e8p_decode, the codebook by its
    definition: x @ (decode(codes) * scale)^T + bias in float32; same tolerance."""
    from rsq.kernels import triton_e8p as E
    from rsq.quant.e8p import codes_to_int16, e8p_decode

    g = torch.Generator().manual_seed(n * k)
    codes = codes_to_int16(torch.randint(0, 1 << 16, (n, k // 8), generator=g))
    scale = torch.tensor([[0.013]])
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16)
    ref = x.float() @ (e8p_decode(codes.reshape(-1)).reshape(n, k) * scale).T + bias.float()
    cfg = E.gemv_config(n, sms=4)
    if k > 1024:
        cfg["BLOCK_C"] = 64  # several steps over K
    y = E.gemv(x, codes, scale, bias, config=cfg)
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel <= 1e-2, f"e8p {n}x{k}: relative error {rel:.2e}"


@pytest.mark.parametrize("n,k,m", [(64, 256, 16), (70, 136, 5)])
def test_e8p_tiles_match_the_codebook(n, k, m):
    """The E8P tile kernels (matmul_small, decoding by codebook gathers, split-K; the dequantizer,
    decoding by arithmetic) against e8p_decode: the dequantized weight exactly (codewords are
    multiples of 1/4 below 3, times one float32 scale), the product within the tolerance above.
    float16 activations: the interpreter's tl.dot multiplies bfloat16 operands as their integer bit
    patterns (NumPy has no bfloat16)."""
    from rsq.kernels import triton_e8p as E
    from rsq.quant.e8p import codes_to_int16, e8p_decode

    g = torch.Generator().manual_seed(n * k + m)
    codes = codes_to_int16(torch.randint(0, 1 << 16, (n, k // 8), generator=g))
    scale = torch.tensor([[0.013]])
    bias = torch.randn(n, generator=g).to(torch.float16)
    x = torch.randn(m, k, generator=g).to(torch.float16)
    w = e8p_decode(codes.reshape(-1)).reshape(n, k) * scale
    assert torch.equal(E.dequantize(codes, scale, torch.float32), w)
    cfg = E.small_config(m, n, k // 8, sms=4)
    assert cfg["SPLIT_K"] > 1, "the case should exercise split-K"
    y = E.matmul_small(x, codes, scale, bias, config=cfg)
    ref = x.float() @ w.T + bias.float()
    rel = ((y.float() - ref).norm() / ref.norm()).item()
    assert rel <= 1e-2, f"e8p small {n}x{k} M={m}: relative error {rel:.2e}"
