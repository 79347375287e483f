"""QuantLinear on CPU against a float64 matmul with W_hat built directly from the codes."""

from __future__ import annotations

import sys

import pytest
import torch

import rsq.kernels.backends as backends
from rsq.formats.uniform import REFERENCE, QuantLinear
from rsq.kernels import Backend, dispatch, select_backend


def random_layer(out_f, in_f, bits, group_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else in_f // group_size
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scale = torch.rand(out_f, groups, generator=g) * 0.02 + 1e-3
    zero = torch.randint(0, 1 << bits, (out_f, groups), generator=g).float()
    bias = torch.randn(out_f, generator=g)
    return codes, scale, zero, bias


def oracle(x, codes, scale, zero, bias, group_size):
    """float64: W[n, k] = scale[n, k // g] * (codes[n, k] - zero[n, k // g])."""
    in_f = codes.shape[1]
    g = in_f if group_size == -1 else group_size
    col_group = torch.arange(in_f) // g
    w = scale.double()[:, col_group] * (codes.double() - zero.double()[:, col_group])
    return x.double() @ w.t() + bias.double()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
def test_forward_matches_oracle_float32(bits, group_size):
    codes, scale, zero, bias = random_layer(48, 256, bits, group_size, seed=bits + group_size)
    layer = QuantLinear.from_codes(codes, scale, zero, bits, group_size, bias=bias, dtype=torch.float32)
    x = torch.randn(2, 3, 256)
    y = layer(x)
    assert y.shape == (2, 3, 48) and y.dtype == torch.float32
    ref = oracle(x, codes, scale, zero, bias, group_size)
    # float32 storage/accumulation over 256 terms vs float64: relative error ~1e-6
    rel = (y.double() - ref).norm() / ref.norm()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("bits,in_f,group_size", [(3, 40, -1), (4, 72, -1), (2, 100, -1), (8, 96, 32), (3, 160, 32)])
def test_odd_widths(bits, in_f, group_size):
    codes, scale, zero, bias = random_layer(7, in_f, bits, group_size, seed=in_f)
    layer = QuantLinear.from_codes(codes, scale, zero, bits, group_size, bias=bias, dtype=torch.float32)
    x = torch.randn(5, in_f)
    rel = (layer(x).double() - oracle(x, codes, scale, zero, bias, group_size)).norm()
    assert rel < 1e-5 * oracle(x, codes, scale, zero, bias, group_size).norm()
    # dequantize_weight is bit-exact with the same float32 expression built from the original codes
    col_group = torch.arange(in_f) // (in_f if group_size == -1 else group_size)
    expected = scale[:, col_group] * (codes.float() - zero[:, col_group])
    assert torch.equal(layer.dequantize_weight(), expected)


def test_bfloat16_layer():
    codes, scale, zero, bias = random_layer(64, 128, 4, 64)
    layer = QuantLinear.from_codes(codes, scale, zero, 4, 64, bias=bias, dtype=torch.bfloat16)
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = oracle(x, codes, scale.bfloat16(), zero, bias.bfloat16(), 64)
    # bf16 output rounding (2^-9 relative) dominates; scales/bias compared at their stored bf16 values
    assert (y.double() - ref).norm() / ref.norm() < 1e-2


def test_state_dict_round_trip_through_empty():
    codes, scale, zero, bias = random_layer(16, 64, 3, 32)
    layer = QuantLinear.from_codes(codes, scale, zero, 3, 32, bias=bias)
    sd = layer.state_dict()
    assert list(sd) == ["qweight", "scales", "qzeros", "bias"]
    assert sd["qweight"].dtype == torch.int32 and sd["qweight"].shape == (16, 2 * 3)
    assert sd["scales"].dtype == torch.bfloat16 and sd["qzeros"].dtype == torch.uint8
    skeleton = QuantLinear.empty(64, 16, 3, 32, bias=True, dtype=torch.bfloat16)
    skeleton.load_state_dict(sd)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(skeleton(x), layer(x))
    no_bias = QuantLinear.empty(64, 16, 4, -1, bias=False, dtype=torch.float16)
    assert list(no_bias.state_dict()) == ["qweight", "scales", "qzeros"]
    assert no_bias.qzeros.unique().tolist() == [8]  # symmetric default zero 2^(bits-1)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="divide"):
        QuantLinear(100, 8, 4, 64)
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(64, 8, 5, -1)
    codes, scale, zero, _ = random_layer(8, 64, 4, 32)
    with pytest.raises(ValueError, match="should be"):
        QuantLinear.from_codes(codes, scale[:, :1], zero[:, :1], 4, 32)
    layer = QuantLinear.from_codes(codes, scale, zero, 4, 32)
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(2, 63, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="triton_gemv"):
        select_backend(torch.randn(1, 64), layer, backend="triton_gemv")


def test_dispatch_on_cpu_uses_reference_without_triton():
    layer = QuantLinear(64, 8, 4, -1)
    assert select_backend(torch.randn(1, 64, dtype=torch.bfloat16), layer).name == "reference"
    # importing the package must not import triton (it is imported lazily by the Triton backends)
    if "triton" not in sys.modules:
        import rsq.formats.uniform  # noqa: F401

        assert "triton" not in sys.modules


def fake_backend(x, qweight, scales, qzeros, bias, *, bits, in_features, group_size):
    return torch.full((x.shape[0], qweight.shape[0]), 7.0, dtype=x.dtype)


def test_dispatch_picks_highest_priority_match(monkeypatch):
    fast = Backend(
        name="fake",
        format_name="uniform",
        function=f"{__name__}:fake_backend",
        bits=(4,),
        dtypes=(torch.float32,),
        device_types=("cpu",),
        group_multiple=32,
        m_max=2,
        priority=50,
    )
    monkeypatch.setattr(backends, "BACKENDS", [fast, REFERENCE])
    layer = QuantLinear(64, 8, 4, 32, dtype=torch.float32)
    assert (dispatch(torch.randn(2, 64), layer) == 7).all()
    assert select_backend(torch.randn(3, 64), layer).name == "reference"  # M above m_max
    assert select_backend(torch.randn(1, 64, dtype=torch.bfloat16), layer).name == "reference"  # dtype
    layer3 = QuantLinear(64, 8, 3, 32, dtype=torch.float32)
    assert select_backend(torch.randn(1, 64), layer3).name == "reference"  # bits
