"""Dequantize once: the two ways a loaded checkpoint computes with W_hat instead of its packed codes.

* :func:`enable_dense_cache` (what rsq.load and from_pretrained do): see below.
* :func:`dense_linears` (``--dense`` of rsq eval / longctx / generate): every packed linear is
  replaced by an ``nn.Linear`` holding W_hat in the model's dtype, for every device and backend.

Dense-weight cache for loaded checkpoints where no GPU kernel runs.

On a CPU (or on CUDA without Triton) a packed linear goes through the pure-torch reference, which
unpacks and dequantizes W_hat on every call: a decoding step re-dequantizes every layer. With the
cache, the first call on a device dequantizes W_hat once (float32, exactly the reference's W_hat)
and keeps it; later calls are one matmul. Same function as the reference (x in float32 @ W_hat^T +
bias, cast back to x's dtype), up to the matmul's summation order.

The cache is a plain attribute (no buffer): state_dict, save_pretrained and the packed buffers are
unchanged. Calls on CUDA with Triton, and QuantLinears with a forced ``backend``, keep the packed
kernels. :func:`disable_dense_cache` restores the packed reference path (kernel tests use it).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from rsq.kernels import has_triton
from rsq.rotation.online import attach_online_rotation

_ATTR = "_rsq_dense"


def _packed_key(module: nn.Module, x: torch.Tensor) -> tuple:
    packed = getattr(module, "qweight", None)
    if packed is None:
        packed = module.codes
    return (x.device, packed.data_ptr(), module.scales.data_ptr(), module.scales._version, packed._version)


def _cached_forward(self, x: torch.Tensor) -> torch.Tensor:
    if (x.is_cuda and has_triton()) or getattr(self, "backend", None) is not None:
        return type(self).forward(self, x)
    if torch.compiler.is_compiling():
        # no data_ptr/_version keys in a graph: use the W_hat an eager call (the prefill) cached on
        # this device, else the packed path (one custom op per linear, rsq/kernels/ops.py)
        cached = getattr(self, _ATTR, None)
        if cached is None or cached[1].device != x.device:
            return type(self).forward(self, x)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), cached[1], bias).to(x.dtype)
    key = _packed_key(self, x)
    cached = self.__dict__.get(_ATTR)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            weight = self.dequantize_weight(torch.float32).to(x.device)
        cached = (key, weight)
        self.__dict__[_ATTR] = cached
    bias = None if self.bias is None else self.bias.float()
    return F.linear(x.float(), cached[1], bias).to(x.dtype)


def _packed(model: nn.Module):
    for module in model.modules():
        if not isinstance(module, nn.Linear) and hasattr(module, "dequantize_weight"):
            yield module


def enable_dense_cache(model: nn.Module) -> int:
    """Route the model's packed linears through the dense cache off the GPU kernels; returns how many."""
    count = 0
    for module in _packed(model):
        module.forward = types.MethodType(_cached_forward, module)
        count += 1
    return count


def disable_dense_cache(model: nn.Module) -> int:
    """Back to the packed path on every call (drops cached weights); returns how many modules."""
    count = 0
    for module in _packed(model):
        module.__dict__.pop("forward", None)
        module.__dict__.pop(_ATTR, None)
        count += 1
    return count


def cached_weights(model: nn.Module) -> int:
    """How many packed linears currently hold a dense W_hat."""
    return sum(_ATTR in m.__dict__ for m in _packed(model))


def dense_linears(model: nn.Module) -> int:
    """Replace every packed linear (a module with ``dequantize_weight``) by an ``nn.Linear`` holding
    W_hat in the model's floating dtype; return how many were replaced. An online rotation on the
    packed linear's input moves to the dense one.

    The same function: the CPU reference kernel also computes x @ W_hat^T from W_hat dequantized in
    float32, only on every call; once is much faster for generation on CPU (one decoding step
    re-dequantizes every layer) and costs the dense weights' memory. Float32 models agree up to the
    summation order of the matmul.
    """
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) or not hasattr(child, "dequantize_weight"):
                continue
            with torch.no_grad():
                weight = child.dequantize_weight(torch.float32).to(dtype)
                bias = None if child.bias is None else child.bias.to(dtype)
            dense = nn.Linear(child.in_features, child.out_features, bias=bias is not None, device="meta")
            dense.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                dense.bias = nn.Parameter(bias, requires_grad=False)
            rotation = getattr(child, "online_rotation", None)
            if rotation is not None:
                attach_online_rotation(dense, rotation.spec)
            setattr(parent, name, dense)
            count += 1
    return count
