"""The kernel backends of every number format, and the one function that picks a backend per call.

Each backend declares, as data (:class:`Backend`), the number format it runs and what it supports:
bit widths, group sizes, activation dtypes, device type, minimum CUDA compute capability and the
range of token counts M (rows of x) it is meant for, plus a priority. :func:`select_backend` runs
the highest-priority backend of the layer's format whose declaration matches the call and whose
packages import. Each format registers its backends in its own file (rsq/formats/<name>.py) with
:func:`register_backend`, including a pure-torch ``reference`` that matches every call and comes
last, so CPU calls and unsupported configurations always have a path.

A function is "module:attr" (imported at its first call, so machines without Triton never import
it) or a callable. All backends of one format share the format's signature::

    fn(x2d (M, in), *tensors, bias | None, **{k: layer.<k> for k in backend.keywords}) -> (M, out)

(with ``flatten=False``: x (..., in) -> (..., out)).

``tensors`` are the layer's packed buffers in the order its format fixes (uniform: qweight,
scales, qzeros; e8p: codes, scales); ``keywords`` name the layer's shape fields the function
takes (default: bits, in_features, group_size).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

HALF = (torch.bfloat16, torch.float16)
ANY_DTYPE = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@dataclass(frozen=True)
class Layer:
    """What selection needs to know of a quantized linear (modules carry the same attributes)."""

    format_name: str
    bits: int
    group_size: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Backend:
    """One kernel of one format and what it supports. ``group_multiple``: group_size must be -1
    (per channel) or a multiple of it (None: any). ``m_max`` None means unbounded. ``requires``:
    packages that must be importable. ``keywords``: the layer fields passed by keyword. ``flatten``:
    the function takes x as (M, in), made contiguous unless it is the reference (False: x (..., in)
    as the caller gave it, for functions built on F.linear, which handles any leading dims)."""

    name: str
    format_name: str
    function: str | Callable
    bits: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    device_types: tuple[str, ...]
    min_capability: tuple[int, int] | None = None
    group_multiple: int | None = None
    m_min: int = 1
    m_max: int | None = None
    priority: int = 0
    requires: tuple[str, ...] = ()
    keywords: tuple[str, ...] = ("bits", "in_features", "group_size")
    flatten: bool = True

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
        if callable(self.function):
            return self.function
        module, attr = self.function.split(":")
        return getattr(importlib.import_module(module), attr)


# every registered backend, all formats; each format's file adds its own (rsq/formats/)
BACKENDS: list[Backend] = []


def register_backend(backend: Backend) -> Backend:
    """Add a backend (replacing the one of the same format and name); returns it."""
    BACKENDS[:] = [b for b in BACKENDS if (b.format_name, b.name) != (backend.format_name, backend.name)]
    BACKENDS.append(backend)
    _CHOSEN.clear()
    return backend


# run_backend's choices: (format, bits, group_size, in_features, dtype, device, M, forced name) ->
# (backend, its function, the registry it was chosen from). Selection is a pure function of that key
# while the registry is unchanged (register_backend clears it; a list replaced or edited another way
# is noticed by its identity and length); caching it takes the per-call selection (a sort, each backend's
# checks, an import lookup) off the host time of every eager quantized matmul (bench/NOTES-speed.md,
# session 16). Bounded: cleared when it holds MAX_CHOSEN keys (M varies with prompt lengths).
_CHOSEN: dict[tuple, tuple[Backend, Callable, tuple]] = {}
MAX_CHOSEN = 4096


def backends_for(format_name: str) -> list[Backend]:
    """The registered backends of one format, highest priority first."""
    return sorted((b for b in BACKENDS if b.format_name == format_name), key=lambda b: -b.priority)


@lru_cache(maxsize=None)
def _importable(packages: tuple[str, ...]) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages)


@lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# checked once at import (a path search, Triton itself is never imported here); a module global is a
# constant to torch.compile. (torch.compiler.assume_constant_result would import torch._dynamo, ~1-3 s
# of every rsq command's start-up.)
_HAS_TRITON = _importable(("triton",))


def has_triton() -> bool:
    """Whether Triton can be imported."""
    return _HAS_TRITON


def _capability(device: torch.device) -> tuple[int, int]:
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def select_backend(x: torch.Tensor, layer, backend: str | None = None) -> Backend:
    """The backend that runs ``x`` (…, in) through ``layer`` (a quantized linear module or a
    :class:`Layer`: format_name, bits, group_size, in_features).

    ``backend`` forces one by name; ValueError (listing the matching ones) if it does not match.
    """
    m = x.numel() // max(layer.in_features, 1)
    key = dict(bits=layer.bits, group_size=layer.group_size, dtype=x.dtype, device=x.device, m=m)
    candidates = backends_for(layer.format_name)
    if not candidates:
        raise ValueError(
            f"no kernel backend is registered for the {layer.format_name!r} format: its file in rsq/formats/ "
            "registers them (rsq.formats.get_format imports it)"
        )
    matching = [b for b in candidates if b.matches(**key)]
    if backend is not None:
        for b in matching:
            if b.name == backend:
                return b
        raise ValueError(
            f"kernel backend {backend!r} does not support this call ({key}); matching: "
            f"{', '.join(b.name for b in matching)}"
        )
    if not matching:
        raise ValueError(
            f"no {layer.format_name} kernel backend supports this call ({key}): the format's reference "
            "backend should match every call"
        )
    return matching[0]


def run_backend(
    x: torch.Tensor,
    tensors: tuple[torch.Tensor, ...] | list[torch.Tensor],
    bias: torch.Tensor | None,
    layer,
    backend: str | None = None,
) -> torch.Tensor:
    """Pick the backend for x (..., in) and run it: (..., out). Eager code only (the body of the
    ``rsq::quant_linear`` custom op under torch.compile)."""
    m = x.numel() // max(layer.in_features, 1)
    registry = (id(BACKENDS), len(BACKENDS))  # a registry replaced or edited in place: choose again
    key = (layer.format_name, layer.bits, layer.group_size, layer.in_features, x.dtype, x.device, m, backend)
    hit = _CHOSEN.get(key)
    if hit is None or hit[2] != registry:
        chosen = select_backend(x, layer, backend)
        if len(_CHOSEN) >= MAX_CHOSEN:
            _CHOSEN.clear()
        hit = _CHOSEN[key] = (chosen, chosen.load(), registry)
    chosen, fn, _ = hit
    kwargs = {k: getattr(layer, k) for k in chosen.keywords}
    if not chosen.flatten:
        return fn(x, *tensors, bias, **kwargs)
    x2d = x.reshape(-1, layer.in_features)
    if chosen.name != "reference":
        x2d = x2d.contiguous()
    return fn(x2d, *tensors, bias, **kwargs).reshape(*x.shape[:-1], layer.out_features)
