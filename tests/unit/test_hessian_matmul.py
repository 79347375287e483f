"""The Hessian's half-precision products (SolverConfig.hessian_matmul), checked on the CPU through
their emulation: float32 matmuls of the same half factors, i.e. exact products and float32 sums,
which is what the tensor cores compute (up to the order of the sums)."""

import pytest
import torch

from rsq.config import RSQConfig, SolverConfig
from rsq.errors import ConfigError
from rsq.solver.hessian import HessianAccumulator, hessian_arithmetic


def _problem(seed=0, tokens=600, width=96):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(2, tokens, width, generator=g) * torch.rand(width, generator=g) * 5).bfloat16()
    x[:, 0] *= 40  # a massive-activation token, as at the attention sink
    w = torch.rand(2, tokens, generator=g) * 3 + 0.1
    w[:, 0] = 97.0  # and the weight attention concentration gives it
    return x, w


def _finalized(parts, x, w, emulate=True, single_dtype=None):
    acc = HessianAccumulator(
        x.shape[-1], half_inputs=True, weighted_parts=parts, emulate=emulate, single_dtype=single_dtype
    )
    acc.add(x, w)
    return acc.finalize().double()


def _exact(x, w):
    xd = x.double().reshape(-1, x.shape[-1])
    return (xd.T @ (xd * w.double().reshape(-1, 1))) * (2.0 / x.shape[0])


def test_split_products_match_float64():
    x, w = _problem()
    H, ref = _finalized(2, x, w), _exact(x, w)
    # x is exact bf16; hi + lo keeps w ⊙ x to ~2^-16; float32 sums of 1200 terms: ~1e-6 relative
    assert ((H - ref).norm() / ref.norm()).item() < 1e-5


def test_single_product_within_the_rounding_bound():
    x, w = _problem(1)
    H, ref = _finalized(1, x, w), _exact(x, w)
    # y = bf16(sqrt(w) ⊙ x) is within u = 2^-8 of sqrt(w) ⊙ x elementwise (round to nearest, 8-bit
    # significand; sqrt in float32: 2^-24), so |y_i y_j - w x_i x_j| <= ((1 + u)^2 - 1) w |x_i x_j|
    # per token; plus float32 sums (2^-20 slack)
    xd = x.double().reshape(-1, x.shape[-1]).abs()
    u = 2.0**-8
    bound = (xd.T @ (xd * w.double().reshape(-1, 1))) * (2.0 / x.shape[0]) * ((1 + u) ** 2 - 1 + 2.0**-20)
    assert ((H - ref).abs() <= bound).all()
    # and it is really the rounded product (not the split): the error is of the bound's order
    assert ((H - ref).abs().max() / bound.max()).item() > 1e-3
    # a Gram matrix: symmetric and positive semi-definite (X^T half(w ⊙ X) is neither: on SmolLM2
    # its mirrored triangle was indefinite beyond 11 dampings)
    assert torch.equal(H, H.T)
    assert torch.linalg.eigvalsh(H).min().item() >= -1e-6 * torch.linalg.eigvalsh(H).max().item()


def test_fp16_single_product_within_its_rounding_bound():
    x, w = _problem(4)
    x[:, 0] *= 50  # the sink token now ~2000x the others: sqrt(97) x that overflows fp16 unscaled
    H, ref = _finalized(1, x, w, single_dtype=torch.float16), _exact(x, w)
    assert torch.isfinite(H).all()
    # the batch is scaled by c = 2^(14 - e), max_t sqrt(w_t)|x_t| = m 2^e (m in [0.5, 1)), then
    # rounded to fp16: a_i = c sqrt(w) x_i is kept to u = 2^-11 relative where |a_i| >= 2^-14 and to
    # 2^-25 absolute below (subnormals). Per token |y_i y_j - a_i a_j| <= d_i (|a_j| + d_j) + |a_i| d_j
    # with d = u |a| + 2^-25; H is the sum scaled back by 1/c^2 (exact); plus float32 sums (2^-20)
    a = x.double().reshape(-1, x.shape[-1]).abs() * w.double().reshape(-1, 1).sqrt()
    c = 2.0 ** (14 - torch.frexp(a.max().float()).exponent.item())
    a = a * c
    d = a * 2.0**-11 + 2.0**-25
    bound = (d.T @ (a + d) + a.T @ d) / c**2 * (2.0 / x.shape[0])
    bound += (a.T @ a) / c**2 * (2.0 / x.shape[0]) * 2.0**-20
    assert ((H - ref).abs() <= bound).all()
    assert ((H - ref).abs().max() / bound.max()).item() > 1e-3  # the rounded product, not an exact one
    # and 8x finer than bf16's single product (u = 2^-8): the error norm at least 4x smaller
    H_bf16 = _finalized(1, x.float().bfloat16(), w)
    assert (H - ref).norm() * 4 < (H_bf16 - ref).norm()
    # still a Gram matrix: symmetric, positive semi-definite
    assert torch.equal(H, H.T)
    assert torch.linalg.eigvalsh(H).min().item() >= -1e-6 * torch.linalg.eigvalsh(H).max().item()


def test_single_equals_split_without_weights_and_with_unit_weights():
    x, _ = _problem(2)
    for w in (None, torch.ones(x.shape[:2])):
        a = HessianAccumulator(x.shape[-1], half_inputs=True, weighted_parts=1, emulate=True)
        b = HessianAccumulator(x.shape[-1], half_inputs=True, weighted_parts=2, emulate=True)
        a.add(x, w)
        b.add(x, w)
        # w = 1: hi = x exactly and lo = 0, so both add the same products
        assert torch.equal(a.finalize(), b.finalize())


def test_auto_off_cuda_is_the_float32_path():
    x, w = _problem(3)
    fp32 = HessianAccumulator(x.shape[-1])
    auto = HessianAccumulator(x.shape[-1], half_inputs=True)  # not emulated: the CPU's own path
    fp32.add(x, w)
    auto.add(x, w)
    assert torch.equal(fp32.finalize(), auto.finalize())


def test_auto_is_fp16_on_cuda_and_float32_here():
    x, w = _problem(5)
    auto, fp16 = hessian_arithmetic("auto"), hessian_arithmetic("fp16")
    # on CUDA (where the half path runs without emulation) auto builds fp16's accumulator
    assert {**auto, "emulate": True} == fp16
    # off CUDA auto is the float32 path, bit for bit
    ref, acc = HessianAccumulator(x.shape[-1]), HessianAccumulator(x.shape[-1], **auto)
    ref.add(x, w)
    acc.add(x, w)
    assert torch.equal(ref.finalize(), acc.finalize())
    assert hessian_arithmetic("split")["weighted_parts"] == 2 and not hessian_arithmetic("fp32")["half_inputs"]


def test_config_values():
    assert SolverConfig().hessian_matmul == "auto"
    for v in ("split", "single", "fp16", "fp32"):
        assert SolverConfig(hessian_matmul=v).hessian_matmul == v
    with pytest.raises(ConfigError, match="hessian_matmul"):
        SolverConfig(hessian_matmul="tf32")
    with pytest.raises(ValueError, match="weighted_parts"):
        HessianAccumulator(8, weighted_parts=3)
    assert RSQConfig().solver.hessian_matmul == "auto"
