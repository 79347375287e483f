"""The base of every quantized linear layer: the buffers are its format's (each format declares its
module in its own file, rsq/formats/<name>.py); the forward is the same for all of them,

    forward(x) = x @ W_hat^T + bias      (rsq.kernels.dispatch: the format's fastest matching backend)

A subclass sets ``format_name`` and gives :meth:`kernel_inputs` (its packed buffers in the order its
format's kernel backends take them) and :meth:`dequantize_weight` (W_hat from the buffers, the
format's one formula). Inference only: no autograd through forward.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from rsq.kernels import dispatch


class QuantizedLinear(nn.Module):
    """``in_features``, ``out_features``, ``bits``, ``group_size`` (-1: per channel or not grouped)
    and ``backend`` (force a kernel backend by name, rsq/kernels/backends.py; None = fastest)."""

    format_name: ClassVar[str]

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.backend: str | None = None

    def kernel_inputs(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """(packed buffers, bias) as the format's backends take them, for an input like ``x``."""
        raise NotImplementedError

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat (out, in) from the stored buffers, computed in float32, returned in ``dtype``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch(x, self, self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
