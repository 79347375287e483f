"""The base of every quantized linear layer: the buffers are its format's (each format declares its
module in its own file, rsq/formats/<name>.py); the forward is the same for all of them,

    forward(x) = x @ W_hat^T + bias      (rsq.kernels.dispatch: the format's fastest matching backend)

A subclass sets ``format_name`` and gives :meth:`kernel_inputs` (its packed buffers in the order its
format's kernel backends take them) and :meth:`dequantize_weight` (W_hat from the buffers, the
format's one formula). Inference only: no autograd through forward.

Dense mode (``dense_cache = True``, set by :func:`rsq.checkpoint.dense.dequantize_once` on loaded
checkpoints): off the GPU kernels (CPU, or CUDA without Triton) and with no forced ``backend``, the
first call on a device dequantizes W_hat once (float32, exactly the reference's W_hat) and keeps it
in the plain attribute ``dense_weight_cache`` (no buffer: state_dict and the packed buffers are
unchanged); later calls are one matmul, x in float32 @ W_hat^T + bias, cast back to x's dtype. The
cache is rebuilt when the packed buffers change (in place or replaced) or the input's device does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rsq.kernels import dispatch, has_triton


class QuantizedLinear(nn.Module):
    """``in_features``, ``out_features``, ``bits``, ``group_size`` (-1: per channel or not grouped)
    and ``backend`` (force a kernel backend by name, rsq/kernels/backends.py; None = fastest);
    ``dense_cache`` turns on the dense mode (the module docstring)."""

    format_name: ClassVar[str]
    # (rsq.generation.fusion.SiblingGroup, index) while fused with its siblings into one GEMM
    sibling: tuple | None = None

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.backend: str | None = None
        self.dense_cache = False
        self.dense_weight_cache: tuple[tuple, torch.Tensor] | None = None  # (packed-buffers key, W_hat)

    def kernel_inputs(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """(packed buffers, bias) as the format's backends take them, for an input like ``x``."""
        raise NotImplementedError

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_hat (out, in) from the stored buffers, computed in float32, returned in ``dtype``."""
        raise NotImplementedError

    def dense_weight(self, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
        """W_hat dequantized once for computing with: the float32 reference W_hat cast to ``dtype``
        (on ``device``), no autograd. Both dequantize-once paths use it (rsq/checkpoint/dense.py)."""
        with torch.no_grad():
            return self.dequantize_weight(torch.float32).to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sibling = self.sibling
        if sibling is not None and sibling[0].active:  # its slice of the group's one product
            return sibling[0].output(sibling[1], x)
        if self.dense_cache and self.backend is None and not (x.is_cuda and has_triton()):
            return self._dense_forward(x)
        return dispatch(x, self, self.backend)

    def _dense_forward(self, x: torch.Tensor) -> torch.Tensor:
        cached = self.dense_weight_cache
        if torch.compiler.is_compiling():
            # no data_ptr/_version keys in a graph: use the W_hat an eager call (the prefill) cached on
            # this device, else the packed path (one custom op per linear, rsq/kernels/ops.py)
            if cached is None or cached[1].device != x.device:
                return dispatch(x, self, self.backend)
        else:
            key = (x.device, *((b.data_ptr(), b._version) for b in self.buffers(recurse=False)))
            if cached is None or cached[0] != key:
                cached = self.dense_weight_cache = (key, self.dense_weight(torch.float32, x.device))
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), cached[1], bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
