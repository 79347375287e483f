"""GPU fast paths of the solver and importance against their eager/CPU forms (skipped without CUDA)."""

import pytest
import torch

from rsq.config import GridConfig, SolverConfig
from rsq.importance import attention_received, attention_received_naive
from rsq.solver.gptq import gptq_quantize
from rsq.solver.hessian import HessianAccumulator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _problem(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * cols, cols, generator=g) @ torch.randn(cols, cols, generator=g) * 0.1
    return torch.randn(rows, cols, generator=g), 2 * X.T @ X / X.shape[0]


@pytest.mark.parametrize(
    "grid", [GridConfig(bits=3), GridConfig(bits=4, group_size=128, symmetric=False), GridConfig(kind="nf", bits=3)]
)
def test_graphed_gptq_equals_eager_on_gpu(grid):
    W, H = _problem(384, 512)
    W, H = W.cuda(), H.cuda()
    eager = gptq_quantize(W, H, grid, SolverConfig(cuda_graphs=False))
    graphed = gptq_quantize(W, H, grid, SolverConfig(cuda_graphs=True))
    again = gptq_quantize(W, H, grid, SolverConfig(cuda_graphs=True))  # replay of a cached graph
    # the same kernels in the same order: bit-identical
    assert torch.equal(eager.weight, graphed.weight) and torch.equal(graphed.weight, again.weight)
    assert torch.equal(eager.codes, graphed.codes)
    cpu = gptq_quantize(W.cpu(), H.cpu(), grid, SolverConfig())
    # GPU vs CPU: float32 Cholesky/matmul rounding differ (~1e-6); rare rounding flips allowed
    assert (cpu.codes == graphed.codes.cpu()).float().mean() > 0.99


@pytest.mark.parametrize("min_block", [2048, 128, 150])
def test_half_hessian_matches_fp32(min_block, monkeypatch):
    # min_block 128 / 150: the upper-block-triangle products in 4 equal / 3 unequal blocks
    import rsq.solver.hessian as Hm

    monkeypatch.setattr(Hm, "MIN_BLOCK", min_block)
    torch.manual_seed(0)
    x = torch.randn(4, 256, 512, device="cuda").bfloat16()
    w = torch.rand(4, 256, device="cuda") * 3
    fast = HessianAccumulator(512, device="cuda", half_inputs=True)
    ref = HessianAccumulator(512, device="cuda", dtype=torch.float64)
    fast.add(x, w)
    ref.add(x, w)
    rel = (fast.finalize().double() - ref.finalize().double()).norm() / ref.finalize().double().norm()
    # the activations are exact bf16; hi/lo keeps w⊙x to ~2^-16; fp32 accumulation of 1024 terms
    assert rel < 1e-5, rel


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_hi_lo_split_against_the_torch_split(dtype, monkeypatch):
    # rsq/kernels/triton_hessian.py: hi is the torch form's bit for bit; lo = rounding of x·w − hi,
    # which FMA contraction may compute exactly before rounding, so elementwise hi + lo is at least
    # as close to the float64 x·w as the torch split
    pytest.importorskip("triton")
    from rsq.kernels.triton_hessian import split_weighted

    torch.manual_seed(1)
    x = (torch.randn(3 * 1000 + 7, 300, device="cuda") * 4).to(dtype)
    w = torch.rand(x.shape[0], device="cuda") * 7
    hi, lo = split_weighted(x, w)
    y = x.float() * w[:, None]
    t_hi = y.to(dtype)
    t_lo = (y - t_hi.float()).to(dtype)
    assert torch.equal(hi, t_hi)
    exact = x.double() * w.double()[:, None]
    err_fused = (hi.double() + lo.double() - exact).abs()
    err_torch = (t_hi.double() + t_lo.double() - exact).abs()
    assert (err_fused <= err_torch).all(), (err_fused - err_torch).max()
    sums = []
    for kernels in ("auto", "reference"):
        acc = HessianAccumulator(300, device="cuda", half_inputs=True, kernels=kernels)
        acc.add(x.reshape(1, -1, 300), w.reshape(1, -1))
        sums.append(acc.sum.double())
    # lo is ~2^-9 of hi and differs in its last bit: ~2^-17 relative on H at most
    assert ((sums[0] - sums[1]).norm() / sums[1].norm()).item() < 1e-5


def test_fused_split_writes_fp16_from_bf16():
    # --hessian-matmul fp16: bf16 activations, the weighted features rounded to fp16 (the torch
    # form's cast bit for bit), and the accumulator's result equal to its torch path's
    pytest.importorskip("triton")
    from rsq.kernels.triton_hessian import split_weighted

    torch.manual_seed(2)
    x = (torch.randn(2 * 1000 + 3, 300, device="cuda") * 4).bfloat16()
    w = torch.rand(x.shape[0], device="cuda") * 7
    hi, lo = split_weighted(x, w, with_lo=False, out_dtype=torch.float16)
    assert lo is None and hi.dtype == torch.float16
    assert torch.equal(hi, (x.float() * w[:, None]).half())
    sums = []
    for kernels in ("auto", "reference"):
        acc = HessianAccumulator(300, device="cuda", half_inputs=True, kernels=kernels, weighted_parts=1,
                                 single_dtype=torch.float16)  # fmt: skip
        acc.add(x.reshape(1, -1, 300), w.reshape(1, -1))
        sums.append(acc.finalize().double())
    # the same fp16 factors; cuBLAS may order the float32 sums differently between the two calls
    assert ((sums[0] - sums[1]).norm() / sums[1].norm()).item() < 1e-6


def test_auto_is_fp16_on_cuda():
    from rsq.solver.hessian import hessian_arithmetic

    torch.manual_seed(3)
    x = (torch.randn(1, 1500, 256, device="cuda") * 3).bfloat16()
    w = torch.rand(1, 1500, device="cuda") * 5
    sums = []
    for mode in ("auto", "fp16"):
        acc = HessianAccumulator(256, device="cuda", **hessian_arithmetic(mode))
        acc.add(x, w)
        sums.append(acc.finalize())
    assert torch.equal(sums[0], sums[1])


def test_half_attention_scores_close_to_fp32():
    torch.manual_seed(0)
    q = torch.randn(2, 8, 1024, 64, device="cuda").bfloat16()
    k = torch.randn(2, 2, 1024, 64, device="cuda").bfloat16()
    # the chunked torch path (Triton's: test_triton_attention)
    fast = attention_received(q, k, query_chunk=256, kernels="reference")
    naive = attention_received_naive(q, k)
    ref = attention_received_naive(q.float(), k.float())
    assert torch.allclose(fast, naive, rtol=1e-3)
    # bf16 logits (as the reference's eager attention): ~1e-2 relative on the column sums
    assert ((fast - ref).abs() / ref).max() < 5e-2


@pytest.mark.parametrize(
    "grid", [GridConfig(bits=3), GridConfig(bits=4, group_size=128, symmetric=False), GridConfig(bits=2, group_size=64)]
)
def test_fused_sub_block_kernel_matches_torch_loop(grid, monkeypatch):
    # rsq/kernels/triton_gptq.py runs each 16-column sub-block's column loop as one kernel; the torch
    # loop is the oracle. Only FMA contraction of the update may differ (last-bit), so codes agree
    # except at rare rounding ties and the GPTQ losses agree closely.
    pytest.importorskip("triton")
    W, H = _problem(384, 512, seed=1)
    W, H = W.cuda(), H.cuda()
    fused = gptq_quantize(W, H, grid, SolverConfig(cuda_graphs=False))
    loop = gptq_quantize(W, H, grid, SolverConfig(cuda_graphs=False), kernels="reference")
    assert (fused.codes == loop.codes).float().mean() > 0.999
    assert abs(fused.loss - loop.loss) <= 1e-3 * loop.loss
    s, z = (
        fused.scale.repeat_interleave(512 // fused.scale.shape[1], 1),
        fused.zero.repeat_interleave(512 // fused.zero.shape[1], 1),
    )
    assert torch.equal(fused.weight, s * (fused.codes.float() - z))  # W_hat is exactly its codes
