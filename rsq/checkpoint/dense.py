"""Dequantize once: a loaded checkpoint's packed linears compute with W_hat instead of unpacking their
codes on every call. One function, :func:`dequantize_once`, with one parameter for what differs:

* ``keep_packed=True`` (what rsq.load and from_pretrained do): every packed linear keeps its packed
  buffers and turns on its own dense mode (``QuantizedLinear.dense_cache``, rsq/nn/linear.py): off
  the GPU kernels its first call on a device dequantizes W_hat once, in float32 (exactly the
  reference kernel's W_hat), and keeps it; later calls are one matmul. state_dict, save_pretrained
  and the GPU kernels are unchanged. :func:`disable_dense_cache` goes back to the packed path.
* ``keep_packed=False`` (``--dense`` of rsq eval / longctx / generate): every packed linear is
  replaced by an ``nn.Linear`` holding W_hat in the model's dtype, for every device and backend (an
  online rotation on its input moves with it).

Both take W_hat from ``QuantizedLinear.dense_weight`` (the float32 reference W_hat, cast). The same
function as the packed path: the CPU reference kernel also computes x @ W_hat^T from W_hat
dequantized in float32, only on every call (a decoding step re-dequantizes every layer). A float32
model computes bit for bit the same in both modes; a 16-bit model computes in float32 with the
cache and in its own dtype with ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from rsq.nn.linear import QuantizedLinear
from rsq.rotation.online import attach_online_rotation


def _packed(model: nn.Module) -> Iterator[tuple[nn.Module, str, QuantizedLinear]]:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear):
                yield parent, name, child


def dequantize_once(model: nn.Module, keep_packed: bool = True) -> int:
    """Make every packed linear of ``model`` compute with W_hat dequantized once (the module
    docstring: ``keep_packed`` keeps the packed modules with a lazy float32 cache, else they are
    replaced by ``nn.Linear`` in the model's dtype); returns how many packed linears."""
    dtype = None if keep_packed else next(p.dtype for p in model.parameters() if p.is_floating_point())
    count = 0
    for parent, name, child in _packed(model):
        count += 1
        if keep_packed:
            child.dense_cache = True
            continue
        bias = None if child.bias is None else child.bias.to(dtype)
        dense = nn.Linear(child.in_features, child.out_features, bias=bias is not None, device="meta")
        dense.weight = nn.Parameter(child.dense_weight(dtype), requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias, requires_grad=False)
        rotation = getattr(child, "online_rotation", None)
        if rotation is not None:
            attach_online_rotation(dense, rotation.spec)
        setattr(parent, name, dense)
    return count


def disable_dense_cache(model: nn.Module) -> int:
    """Back to the packed path on every call (drops cached weights); returns how many modules."""
    count = 0
    for _, _, module in _packed(model):
        module.dense_cache, module.dense_weight_cache = False, None
        count += 1
    return count


def cached_weights(model: nn.Module) -> int:
    """How many packed linears currently hold a dense W_hat."""
    return sum(module.dense_weight_cache is not None for _, _, module in _packed(model))
