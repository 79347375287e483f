"""rsq's inference modules under torch.compile(fullgraph=True), on CPU with the reference backend.

fullgraph=True raises on any graph break, so each test fails if a module's forward stops being
traceable (a Python branch on tensor data, an import, a Triton launch wrapper in the graph). The
oracles: the eager module's own output (the compiled graph runs the same ops: "aot_eager" replays
the traced aten graph, bit for bit; inductor fuses, so float32 rounding may differ) and, for the
custom ops, torch.library.opcheck (the fake functions' shapes/dtypes against real calls, the
schema's mutation and aliasing claims).
"""

from __future__ import annotations

import pytest
import torch

from rsq.formats.e8p import E8PLinear
from rsq.formats.nf import NFQuantLinear
from rsq.formats.uniform import QuantLinear
from rsq.kernels import ops
from rsq.quant.e8p import codes_to_int16
from rsq.rotation.online import OnlineRotation, OnlineRotationModule


def uniform_layer(bits: int, group_size: int, bias: bool = True, seed: int = 0) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = 48, 256
    groups = 1 if group_size == -1 else in_f // group_size
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scale = torch.rand(out_f, groups, generator=g) * 0.02 + 1e-3
    zero = torch.randint(0, 1 << bits, (out_f, groups), generator=g).float()
    b = torch.randn(out_f, generator=g) if bias else None
    return QuantLinear.from_codes(codes, scale, zero, bits, group_size, bias=b, dtype=torch.float32)


def e8p_layer(seed: int = 0) -> E8PLinear:
    g = torch.Generator().manual_seed(seed)
    layer = E8PLinear(256, 48, True, torch.float32)
    layer.codes.copy_(codes_to_int16(torch.randint(0, 1 << 16, (48, 32), generator=g)))
    layer.scales.fill_(0.02)
    layer.bias.normal_(generator=g)
    return layer


def compiled_equals_eager(module: torch.nn.Module, x: torch.Tensor) -> None:
    torch._dynamo.reset()
    got = torch.compile(module, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(got, module(x))


@pytest.mark.parametrize("bits,group_size", [(3, -1), (4, -1), (3, 128), (4, 32), (2, 64), (8, -1)])
def test_quant_linear_fullgraph(bits, group_size):
    compiled_equals_eager(uniform_layer(bits, group_size), torch.randn(2, 3, 256))


def test_e8p_linear_fullgraph():
    compiled_equals_eager(e8p_layer(), torch.randn(2, 5, 256))


def test_nf_linear_fullgraph():
    layer = NFQuantLinear(256, 48, 3, 128, False, torch.float32)
    layer.qweight.random_(-(2**31), 2**31 - 1)
    compiled_equals_eager(layer, torch.randn(4, 256))


@pytest.mark.parametrize(
    "kind,size,head_dim",
    [("full", 96, 1), ("full", 128, 1), ("cross_head", 4, 16), ("block", 96, 32), ("random_full", 12, 1)],
)
def test_online_rotation_fullgraph(kind, size, head_dim):
    n = size * head_dim if kind.endswith("cross_head") else size
    compiled_equals_eager(OnlineRotationModule(OnlineRotation("m", kind, size, head_dim)), torch.randn(3, 2, n))


def test_rsq_ops_are_in_the_graph():
    """The compiled graph holds rsq's kernels as single custom-op nodes (not their Python)."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    nf = NFQuantLinear(256, 48, 3, 128, False, torch.float32)
    for module in (uniform_layer(3, -1), e8p_layer(), nf):
        before = len(seen)
        torch.compile(module, fullgraph=True, backend=backend)(torch.randn(1, 256))
        assert torch.ops.rsq.quant_linear.default in {getattr(t, "default", t) for t in seen[before:]}, module
    rotation = OnlineRotationModule(OnlineRotation("m", "full", 96))
    torch.compile(rotation, fullgraph=True, backend=backend)(torch.randn(1, 96))
    assert torch.ops.rsq.hadamard.default in {getattr(t, "default", t) for t in seen}


def test_quant_linear_inductor():
    """Inductor (the default backend) compiles around the custom op; its float32 matmul may sum in
    another order than eager: relative error at float32 rounding of a 256-term dot product."""
    layer = uniform_layer(4, 128)
    x = torch.randn(2, 3, 256)
    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True)(x)
    ref = layer(x)
    assert ((got - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_quant_linear_uniform(bias):
    layer = uniform_layer(3, 128, bias=bias)
    tensors = [layer.qweight, layer.scales, layer.qzeros]
    args = (torch.randn(5, 256), tensors, layer.bias, "uniform", [3, 256, 128, 48], None)
    torch.library.opcheck(ops.quant_linear, args)


def test_opcheck_e8p_and_hadamard():
    layer = e8p_layer()
    args = (torch.randn(6, 256), [layer.codes, layer.scales], layer.bias, "e8p", [2, 256, -1, 48], None)
    torch.library.opcheck(ops.quant_linear, args)
    for kind, size, head_dim, width in (
        ("full", 96, 1, 96),
        ("cross_head", 4, 16, 64),
        ("block", 96, 32, 96),
        ("block", 96, 48, 96),
    ):
        torch.library.opcheck(ops.hadamard, (torch.randn(3, width), kind, size, head_dim))
