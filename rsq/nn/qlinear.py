"""QuantLinear: a linear layer whose weight is stored as packed uniform-grid codes.

    W_hat[n, k] = scales[n, k // group_size] * (code[n, k] - qzeros[n, k // group_size])
    forward(x) = x @ W_hat^T + bias          (through rsq.kernels.dispatch)

Buffers (exactly the state_dict keys; rsq/checkpoint/schema.py is the on-disk contract):
    qweight  int32 (out, ceil(in / 32) * bits)   codes packed by rsq.quant.pack.pack_codes
    scales   (out, n_groups), the compute dtype
    qzeros   uint8 (out, n_groups)
    bias     (out,), the compute dtype, only when the layer has one
n_groups = 1 for group_size == -1 (per channel), else in_features // group_size.
"""

from __future__ import annotations

import torch
from torch import nn

from rsq.kernels import dispatch
from rsq.kernels.reference import dequantize
from rsq.quant.pack import check_bits, pack_codes, pack_scales, pack_zeros, packed_width


def _n_groups(in_features: int, group_size: int) -> int:
    if group_size == -1:
        return 1
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group_size {group_size} does not divide in_features {in_features}: use -1 (per channel) "
            "or a group size that divides the layer's width"
        )
    return in_features // group_size


class QuantLinear(nn.Module):
    """Inference-only linear layer with packed 2/3/4/8-bit weights (no autograd through forward)."""

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
        super().__init__()
        check_bits(bits)
        groups = _n_groups(in_features, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.backend: str | None = None  # force a kernel backend by name (rsq.kernels); None = fastest
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
    ) -> "QuantLinear":
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
    ) -> "QuantLinear":
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

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat (out, in) from the stored buffers, computed in float32, returned in ``dtype``."""
        return dequantize(
            self.qweight,
            self.scales,
            self.qzeros,
            bits=self.bits,
            in_features=self.in_features,
            group_size=self.group_size,
        ).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch(x, self, self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
