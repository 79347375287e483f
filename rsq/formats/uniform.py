"""The uniform integer grid: codes c in [0, 2^bits - 1] with a per-(row, group) scale and zero point,

    W_hat[n, k] = scales[n, k // group_size] * (code[n, k] - qzeros[n, k // group_size])

solved by GPTQ, exported to compressed-tensors and GPTQ (rsq/checkpoint/exporters.py: 2/3/4/8 bits
both). This file declares everything that runs it:

* :class:`QuantLinear`, its module. Buffers (exactly the state_dict keys; rsq/checkpoint/schema.py
  is the on-disk contract): ``qweight`` int32 (out, ceil(in / 32) * bits), codes packed densely
  along the input dim by rsq.quant.pack.pack_codes; ``scales`` (out, n_groups), the compute dtype;
  ``qzeros`` uint8 (out, n_groups); ``bias`` (out,), the compute dtype, only when the layer has one.
  n_groups = 1 for group_size == -1 (per channel), else in_features // group_size.
* its kernel backends (:data:`BACKENDS`), all with the signature
  ``fn(x2d (M, in), qweight, scales, qzeros, bias | None, *, bits, in_features, group_size) -> (M, out)``:
  humming-kernels (optional, ``rsq[gpu]``) for 2+ tokens where installed, rsq's Triton GEMV for one
  token, rsq's Triton tiles / dequantize + cuBLAS otherwise, and the pure-torch reference
  (rsq/kernels/reference.py), which matches every call. Priorities follow bench/NOTES-kernels.md.
"""

from __future__ import annotations

import torch

from rsq.formats.base import NumberFormat, ScalarOps, register_format
from rsq.kernels import reference
from rsq.kernels.backends import ANY_DTYPE, HALF, Backend, has_triton, register_backend
from rsq.nn.linear import QuantizedLinear
from rsq.quant import grid as G
from rsq.quant.pack import SUPPORTED_BITS, check_bits, pack_codes, pack_scales, pack_zeros, packed_width


def find_params(w: torch.Tensor, grid, kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale/zero (rows, 1) of :func:`rsq.quant.grid.find_params`; with ``kernels="auto"``
    the MSE clip search of a CUDA tensor runs as one Triton kernel (rsq/kernels/triton_scales.py,
    tested against the torch loop)."""
    if grid.mse_clip and w.is_cuda and kernels == "auto" and has_triton():
        from rsq.kernels.triton_scales import clip_search

        scale, zero = clip_search(w.float(), grid.bits, grid.symmetric, grid.clip_grid, grid.max_shrink, grid.clip_norm)
        return scale[:, None], zero[:, None]
    return G.find_params(w, grid)


def find_group_params(w: torch.Tensor, grid, kernels: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale/zero (rows, n_groups) for every group, the search as :func:`find_params`."""
    return G.find_group_params(w, grid, find=lambda wg, g: find_params(wg, g, kernels))


class UniformOps(ScalarOps):
    fused_gptq = True

    def params(self, W):
        return find_params(W, self.grid, self.kernels)

    def group_params(self, W):
        return find_group_params(W, self.grid, self.kernels)

    def round(self, w, s, z):
        c = G.quantize_codes(w, s, z, self.grid.bits)
        return c, G.dequantize_codes(c, s, z)


def _n_groups(in_features: int, group_size: int) -> int:
    if group_size == -1:
        return 1
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide in_features {in_features}: use -1 (per channel) "
            "or a group size that divides the layer's width"
        )
    return in_features // group_size


class QuantLinear(QuantizedLinear):
    """Inference-only linear layer with packed 2/3/4/8-bit uniform codes (no autograd through forward)."""

    format_name = "uniform"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = -1,
        bias: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        check_bits(bits)
        groups = _n_groups(in_features, group_size)
        super().__init__(in_features, out_features, bits, group_size)
        kw = dict(device=device)
        self.register_buffer(
            "qweight", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.int32, **kw)
        )
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, **kw))
        self.register_buffer("qzeros", torch.full((out_features, groups), 1 << (bits - 1), dtype=torch.uint8, **kw))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, **kw) if bias else None)

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        dtype: torch.dtype = torch.bfloat16,
    ) -> QuantLinear:
        """A skeleton to be filled by load_state_dict (all codes zero, scales one)."""
        return cls(in_features, out_features, bits, group_size, bias, dtype)

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ) -> QuantLinear:
        """From solver output: codes (out, in) in [0, 2^bits - 1], scale and zero (out, n_groups)."""
        out_features, in_features = codes.shape
        groups = _n_groups(in_features, group_size)
        if scale.shape != (out_features, groups) or zero.shape != (out_features, groups):
            raise ValueError(
                f"scale {tuple(scale.shape)} / zero {tuple(zero.shape)} should be ({out_features}, {groups}) for "
                f"codes {tuple(codes.shape)} with group_size {group_size}"
            )
        module = cls(in_features, out_features, bits, group_size, bias is not None, dtype, device=codes.device)
        module.qweight.copy_(pack_codes(codes, bits))
        module.scales.copy_(pack_scales(scale, dtype))
        module.qzeros.copy_(pack_zeros(zero, bits))
        if bias is not None:
            module.bias.copy_(bias.detach().to(dtype))
        return module

    def kernel_inputs(self, x):
        return (self.qweight, self.scales, self.qzeros), self.bias

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return reference.dequantize(
            self.qweight,
            self.scales,
            self.qzeros,
            bits=self.bits,
            in_features=self.in_features,
            group_size=self.group_size,
        ).to(dtype)


_TRITON = dict(
    format_name="uniform",
    bits=SUPPORTED_BITS,
    dtypes=HALF,
    device_types=("cuda",),
    min_capability=(8, 0),
    group_multiple=32,
    requires=("triton",),
)

BACKENDS = (
    # 2-2048+ tokens: humming-kernels (vLLM's JIT GEMM library), converted per layer at first use and
    # checked against the reference; 1.5-2x bf16 at 16-64 tokens where the Triton tiles are 0.3-0.9x
    Backend(
        name="humming",
        function="rsq.kernels.humming_backend:matmul",
        **{**_TRITON, "requires": ("humming", "triton")},
        m_min=2,
        priority=40,
    ),
    # decode, M <= 4: CUDA-core kernel (codes -> floats with one LOP3), one program per 8 rows
    Backend(name="triton_gemv", function="rsq.kernels.triton_wq:gemv", m_max=4, priority=30, **_TRITON),
    # small batch: tensor-core tiles of 16 tokens, split-K for occupancy
    Backend(name="triton_small", function="rsq.kernels.triton_wq:matmul_small", m_max=64, priority=20, **_TRITON),
    # prefill: dequantize the whole weight to bf16/fp16 with Triton, then cuBLAS
    Backend(
        name="triton_dequant_mm", function="rsq.kernels.triton_wq:dequant_matmul", m_min=65, priority=15, **_TRITON
    ),
    # prefill: fused dequant-in-registers + tl.dot GEMM
    Backend(name="triton_gemm", function="rsq.kernels.triton_wq:matmul_large", m_min=65, priority=10, **_TRITON),
    # everything else (CPU, float32, other group sizes, old GPUs): unpack, dequantize, matmul in float32
    Backend(
        name="reference",
        format_name="uniform",
        function=reference.wq_matmul,
        bits=SUPPORTED_BITS,
        dtypes=ANY_DTYPE,
        device_types=("cpu", "cuda"),
        m_min=0,
        priority=-100,
    ),
)
REFERENCE = BACKENDS[-1]


class Uniform(NumberFormat):
    name = "uniform"
    bits = SUPPORTED_BITS
    solver = "gptq"
    stackable = True
    tensor_keys = ("qweight", "scales", "qzeros")
    exports = {"compressed-tensors": None, "gptq": None}

    def ops(self, grid, device, kernels="auto"):
        return UniformOps(grid, device, kernels)

    def rtn(self, W, grid, kernels="auto"):
        return G.rtn_quantize(W.float(), grid, find=lambda wg, g: find_params(wg, g, kernels))

    def dequantize(self, codes, scale, zero, bits):
        return G.dequantize_grouped(codes, scale, zero)

    def stored_tensors(self, res, grid, dtype):
        return {
            "qweight": pack_codes(res.codes, grid.bits),
            "scales": pack_scales(res.scale, dtype),
            "qzeros": pack_zeros(res.zero, grid.bits),
        }

    def empty_module(self, in_features, out_features, bits, group_size, bias, dtype):
        return QuantLinear.empty(in_features, out_features, bits, group_size, bias, dtype)


register_format(Uniform())
for _backend in BACKENDS:
    register_backend(_backend)
