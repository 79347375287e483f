"""Inference kernels: the quantized matmul of every number format and the online Hadamard.

    backends.py   Backend (what one kernel supports, as data), the registry, select_backend (the
                  one selection function: format, bits, group size, dtype, device, M) and run_backend
    ops.py        the same as torch.library custom ops, for torch.compile
    hadamard.py   which implementation runs an online Hadamard rotation
    reference.py  the uniform format's pure-torch matmul (the oracle of its kernels)
    triton_*.py   rsq's own Triton kernels; humming_backend.py: humming-kernels for the uniform format

Which backends a format has is declared in the format's own file (rsq/formats/<name>.py), which
registers them here; the modules (rsq/nn/linear.py) call :func:`dispatch`. Priorities follow the
measurements in bench/NOTES-kernels.md.
"""

from __future__ import annotations

import torch

from rsq.kernels import ops
from rsq.kernels.backends import (
    BACKENDS,
    Backend,
    Layer,
    backends_for,
    has_triton,
    register_backend,
    run_backend,
    select_backend,
)


def dispatch(x: torch.Tensor, layer, backend: str | None = None) -> torch.Tensor:
    """y = x @ W_hat^T + bias for a quantized linear module ``layer`` (format_name, bits,
    group_size, in_features, out_features and ``kernel_inputs(x) -> (tensors, bias)``).
    x: (..., in_features) -> (..., out_features).

    While torch.compile traces, the call is the ``rsq::quant_linear`` custom op (rsq/kernels/ops.py):
    backend choice and kernel launch stay outside the graph, which sees one opaque matmul."""
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {layer.in_features}")
    tensors, bias = layer.kernel_inputs(x)
    if torch.compiler.is_compiling():
        shape = [layer.bits, layer.in_features, layer.group_size, layer.out_features]
        return ops.quant_linear(x, list(tensors), bias, layer.format_name, shape, backend)
    return run_backend(x, tensors, bias, layer, backend)


__all__ = [
    "BACKENDS",
    "Backend",
    "Layer",
    "backends_for",
    "dispatch",
    "has_triton",
    "register_backend",
    "run_backend",
    "select_backend",
]
