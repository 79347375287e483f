"""The format seam on CPU: a format declares its module and kernel backends in its own file and
rsq/kernels/backends.py's one selection function picks among them.

Oracles: for E8P, the token ranges of the dispatcher it replaced (one token: GEMV; 2-64: tiles;
65+: decode + cuBLAS; anything but bf16/fp16 on CUDA with Triton: the reference); for a format
defined here alone, its own pure-torch matmul (x @ (scale * W)^T, exact in float32 for these small
integers) and the eager call under torch.compile(fullgraph=True).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import rsq.kernels.backends as backends
from rsq.formats import get_format
from rsq.kernels import Backend, Layer, register_backend, select_backend
from rsq.nn.linear import QuantizedLinear


def fake_x(m: int, k: int, dtype=torch.bfloat16, device="cuda"):
    """What selection reads of an input (numel, dtype, device), without a GPU."""
    return SimpleNamespace(numel=lambda: m * k, dtype=dtype, device=torch.device(device))


def test_every_builtin_format_has_a_reference_that_matches_everything():
    for name in ("uniform", "nf", "e8p"):
        names = get_format(name).backends()
        assert names[-1] == "reference", name
        layer = Layer(name, 2, -1, 64, 8)
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            assert select_backend(torch.zeros(3, 64, dtype=dtype), layer).name == "reference"


def test_e8p_kernels_are_picked_by_token_count(monkeypatch):
    get_format("e8p")
    monkeypatch.setattr(backends, "_importable", lambda packages: True)  # as on a GPU machine with Triton
    layer = Layer("e8p", 2, -1, 512, 256)
    for m, want in (
        (1, "triton_e8p_gemv"),
        (2, "triton_e8p_small"),
        (64, "triton_e8p_small"),
        (65, "triton_e8p_dequant_mm"),
    ):
        for dtype in (torch.bfloat16, torch.float16):
            assert select_backend(fake_x(m, 512, dtype), layer).name == want, (m, dtype)
    assert select_backend(fake_x(1, 512, torch.float32), layer).name == "reference"
    assert select_backend(fake_x(1, 512, device="cpu"), layer).name == "reference"
    monkeypatch.setattr(backends, "_importable", lambda packages: "triton" not in packages)  # no Triton
    assert select_backend(fake_x(1, 512), layer).name == "reference"


def test_unregistered_format_is_named_in_the_error():
    with pytest.raises(ValueError, match="no kernel backend is registered for the 'nonesuch' format"):
        select_backend(torch.zeros(1, 8), Layer("nonesuch", 4, -1, 8, 2))


# -- a format declared in this file alone: its module and its backends, nothing in rsq edited --


class ScaledIntLinear(QuantizedLinear):
    format_name = "test_scaled_int"

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bits=4, group_size=-1)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(1))
        self.register_buffer("bias", None)

    def kernel_inputs(self, x):
        return (self.codes, self.scale), self.bias

    def dequantize_weight(self, dtype=torch.float32):
        return (self.codes.float() * self.scale).to(dtype)


def scaled_int_reference(x, codes, scale, bias):
    return F.linear(x, (codes.float() * scale).to(x.dtype), bias)


def scaled_int_fast(x, codes, scale, bias, *, in_features):
    assert x.dim() == 2 and x.is_contiguous() and in_features == codes.shape[1]
    return x @ (codes.float() * scale).to(x.dtype).t()


@pytest.fixture
def scaled_int(monkeypatch):
    monkeypatch.setattr(backends, "BACKENDS", list(backends.BACKENDS))  # registrations undone afterwards
    common = dict(format_name="test_scaled_int", bits=(4,), device_types=("cpu",), keywords=())
    register_backend(
        Backend(
            name="reference",
            function=scaled_int_reference,
            dtypes=(torch.float32, torch.float64),
            m_min=0,
            priority=-100,
            flatten=False,
            **common,
        )
    )
    fast = Backend(
        name="fast",
        function=f"{__name__}:scaled_int_fast",
        dtypes=(torch.float32,),
        m_min=2,
        m_max=8,
        priority=10,
        **{**common, "keywords": ("in_features",)},
    )
    register_backend(fast)
    layer = ScaledIntLinear(16, 5)
    g = torch.Generator().manual_seed(0)
    layer.codes.copy_(torch.randint(-8, 8, (5, 16), generator=g, dtype=torch.int8))
    layer.scale.fill_(0.25)
    return layer


def test_a_new_format_runs_through_the_same_selection(scaled_int):
    layer = scaled_int
    w = layer.dequantize_weight(torch.float64)
    x = torch.randint(-4, 4, (2, 3, 16)).float()
    assert select_backend(x, layer).name == "fast"
    assert select_backend(x[0, :1], layer).name == "reference"  # M = 1 is below m_min
    assert select_backend(torch.zeros(9, 16), layer).name == "reference"  # M = 9 is above m_max
    assert select_backend(x.double(), layer).name == "reference"  # dtype
    for inp in (x, x[0, :1], x.double()):
        y = layer(inp)
        assert y.shape == (*inp.shape[:-1], 5) and y.dtype == inp.dtype
        assert torch.equal(y.double(), inp.double() @ w.t())  # small integers times 1/4: exact
    layer.backend = "reference"
    assert torch.equal(layer(x), scaled_int_reference(x, layer.codes, layer.scale, None))


def test_a_new_format_compiles_to_the_one_custom_op(scaled_int):
    layer = scaled_int
    x = torch.randn(2, 3, 16)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend=backend)(x)
    assert torch.ops.rsq.quant_linear.default in {getattr(t, "default", t) for t in seen}
    assert torch.equal(got, layer(x))


def test_run_backends_cached_choice_follows_the_registry(scaled_int, monkeypatch):
    """run_backend remembers its choice per (layer shape, dtype, device, M) and chooses again when a
    backend is registered or the registry is replaced: the calls' outputs say which one ran."""
    layer = scaled_int
    x = torch.randint(-4, 4, (3, 16)).float()
    calls = []

    def marked(name):
        def fn(x2d, codes, scale, bias, **kw):
            calls.append(name)
            return scaled_int_reference(x2d, codes, scale, bias)

        return fn

    common = dict(format_name="test_scaled_int", bits=(4,), device_types=("cpu",), keywords=(), dtypes=(torch.float32,))
    layer(x)
    layer(x)  # "fast" (not marked) twice: the cached choice
    register_backend(Backend(name="faster", function=marked("faster"), priority=20, **common))
    layer(x)
    assert calls == ["faster"]
    monkeypatch.setattr(
        backends,
        "BACKENDS",
        [b for b in backends.BACKENDS if b.name != "faster"]
        + [Backend(name="other", function=marked("other"), priority=30, **common)],
    )
    layer(x)
    assert calls == ["faster", "other"]
