"""Weight-only quantized matmul backends and the dispatcher that picks one per call.

Every backend declares, as data (:class:`Backend`), what it supports: bit widths, group sizes,
activation dtypes, device type, minimum CUDA compute capability and the range of token counts M
(rows of x) it is meant for, plus a priority. :func:`dispatch` runs the highest-priority backend
whose declaration matches the call and whose packages import; the pure-torch reference
(rsq/kernels/reference.py) matches everything and comes last, so CPU calls and unsupported
configurations always have a path. Priorities follow the measurements in bench/NOTES-kernels.md:
humming-kernels (optional, ``rsq[gpu]``) for 2+ tokens where installed, rsq's Triton GEMV for one
token, rsq's Triton tiles / dequantize + cuBLAS otherwise.

Backends are imported lazily (``function`` is "module:attr"), so machines without Triton never
import it. All backends share one signature::

    fn(x2d (M, in), qweight, scales, qzeros, bias | None, *, bits, in_features, group_size) -> (M, out)
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

logger = logging.getLogger(__name__)

_HALF = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Backend:
    """What one backend supports. ``group_multiple``: group_size must be -1 (per channel) or a
    multiple of it (None: any). ``m_max`` None means unbounded."""

    name: str
    function: str
    bits: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    device_types: tuple[str, ...]
    min_capability: tuple[int, int] | None = None
    group_multiple: int | None = None
    m_min: int = 1
    m_max: int | None = None
    priority: int = 0
    requires: tuple[str, ...] = ()

    def matches(self, *, bits: int, group_size: int, dtype: torch.dtype, device: torch.device, m: int) -> bool:
        if bits not in self.bits or dtype not in self.dtypes or device.type not in self.device_types:
            return False
        if m < self.m_min or (self.m_max is not None and m > self.m_max):
            return False
        if self.group_multiple is not None and group_size != -1 and group_size % self.group_multiple:
            return False
        if self.min_capability is not None:
            if device.type != "cuda" or _capability(device) < self.min_capability:
                return False
        return _importable(self.requires)

    def load(self) -> Callable:
        module, attr = self.function.split(":")
        return getattr(importlib.import_module(module), attr)


REFERENCE = Backend(
    name="reference",
    function="rsq.kernels.reference:wq_matmul",
    bits=(2, 3, 4, 8),
    dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64),
    device_types=("cpu", "cuda"),
    m_min=0,
    priority=-100,
)

_TRITON = dict(
    bits=(2, 3, 4, 8),
    dtypes=_HALF,
    device_types=("cuda",),
    min_capability=(8, 0),
    group_multiple=32,
    requires=("triton",),
)

BACKENDS: list[Backend] = [
    # 2-2048+ tokens: humming-kernels (vLLM's JIT GEMM library), converted per layer at first use and
    # checked against the reference; 1.5-2x bf16 at 16-64 tokens where the Triton tiles are 0.3-0.9x
    Backend(
        name="humming",
        function="rsq.kernels.humming_backend:matmul",
        bits=(2, 3, 4, 8),
        dtypes=_HALF,
        device_types=("cuda",),
        min_capability=(8, 0),
        group_multiple=32,
        m_min=2,
        priority=40,
        requires=("humming", "triton"),
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
    REFERENCE,
]


def register_backend(backend: Backend) -> None:
    """Add a backend (replacing one of the same name)."""
    BACKENDS[:] = [b for b in BACKENDS if b.name != backend.name] + [backend]


@lru_cache(maxsize=None)
def _importable(packages: tuple[str, ...]) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


@lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@torch.compiler.assume_constant_result
def has_triton() -> bool:
    """Whether Triton can be imported (checked once, never imported here; a constant to
    torch.compile)."""
    return _importable(("triton",))


def _capability(device: torch.device) -> tuple[int, int]:
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def select_backend(x: torch.Tensor, qlinear, backend: str | None = None) -> Backend:
    """The backend :func:`dispatch` would run for ``x`` (…, in) and ``qlinear``.

    ``backend`` forces one by name; ValueError (listing the matching ones) if it does not match.
    """
    m = x.numel() // max(qlinear.in_features, 1)
    key = dict(bits=qlinear.bits, group_size=qlinear.group_size, dtype=x.dtype, device=x.device, m=m)
    matching = sorted((b for b in BACKENDS if b.matches(**key)), key=lambda b: -b.priority)
    if backend is not None:
        for b in matching:
            if b.name == backend:
                return b
        raise ValueError(
            f"kernel backend {backend!r} does not support this call ({key}); matching: "
            f"{', '.join(b.name for b in matching)}"
        )
    return matching[0] if matching else REFERENCE


def run_backend(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    in_features: int,
    group_size: int,
    backend: str | None = None,
) -> torch.Tensor:
    """Pick the backend for x2d (M, in) and run it: (M, out). Eager code only (the body of the
    ``rsq::wq_linear`` custom op under torch.compile)."""
    layer = _Layer(bits, group_size, in_features)
    chosen = select_backend(x2d, layer, backend)
    if chosen is not REFERENCE:
        x2d = x2d.contiguous()
    return chosen.load()(x2d, qweight, scales, qzeros, bias, bits=bits, in_features=in_features, group_size=group_size)


@dataclass(frozen=True)
class _Layer:
    bits: int
    group_size: int
    in_features: int


def dispatch(x: torch.Tensor, qlinear, backend: str | None = None) -> torch.Tensor:
    """y = x @ W_hat^T + bias for a QuantLinear-like object (qweight, scales, qzeros, bias, bits,
    group_size, in_features, out_features). x: (..., in_features) -> (..., out_features).

    While torch.compile traces, the call is the ``rsq::wq_linear`` custom op (rsq/kernels/ops.py):
    backend choice and kernel launch stay outside the graph, which sees one opaque matmul."""
    if x.shape[-1] != qlinear.in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {qlinear.in_features}")
    x2d = x.reshape(-1, qlinear.in_features)
    args = (x2d, qlinear.qweight, qlinear.scales, qlinear.qzeros, qlinear.bias)
    meta = (qlinear.bits, qlinear.in_features, qlinear.group_size, backend)
    if torch.compiler.is_compiling():
        y = ops.wq_linear(*args, *meta)
    else:
        y = run_backend(*args, *meta)
    return y.reshape(*x.shape[:-1], qlinear.out_features)


from rsq.kernels import ops  # noqa: E402  (the custom ops; imports nothing of rsq at load)

__all__ = [
    "Backend",
    "BACKENDS",
    "REFERENCE",
    "dispatch",
    "has_triton",
    "register_backend",
    "run_backend",
    "select_backend",
]
