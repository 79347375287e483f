"""The protocol every number format implements, and the registry that maps names to formats.

A number format is everything rsq knows about one way of storing a weight matrix: which bit widths
it takes, which solver finds its codes, the per-element operations that solver needs, how stored
codes turn back into weights, which tensors a checkpoint holds for one linear, the ``nn.Module``
that runs it (a :class:`rsq.nn.linear.QuantizedLinear`), its kernel backends (registered with
:func:`rsq.kernels.backends.register_backend`), and where it can be exported. The solvers, the pipeline, the
checkpoint code, export and the CLI ask :func:`get_format` instead of branching on a name, so a new
format is one module in this package plus its :func:`register_format` call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from rsq.errors import ConfigError, ExportError
from rsq.kernels.backends import backends_for

if TYPE_CHECKING:
    from torch import nn

    from rsq.config import GridConfig
    from rsq.solver.result import QuantResult


class ScalarOps:
    """The three per-element operations GPTQ needs from a scalar grid, bound to one GridConfig:
    row parameters for a block of columns taken as one group, parameters for every group of a
    matrix, and rounding one column to (codes, W_hat). ``fused_gptq`` says whether the CUDA
    sub-block kernel (rsq/kernels/triton_gptq.py, uniform codes with zero points) implements
    ``round`` exactly."""

    fused_gptq: ClassVar[bool] = False

    def __init__(self, grid: GridConfig, device: torch.device, kernels: str = "auto"):
        self.grid = grid
        self.kernels = kernels

    def params(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def group_params(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def round(self, w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class NumberFormat:
    """One number format (subclass it and register an instance; the instance holds no state).

    name: the ``--grid`` value and the checkpoint's ``quantization_config.grid``.
    bits: the widths it stores.
    solver: "gptq" (column-by-column with :attr:`ops`) or "ldlq" (a vector codebook).
    stackable: members of a group that share a Hessian may be solved as one stacked matrix (the
        solver treats rows independently and no parameter spans rows).
    tensor_keys: the tensors a checkpoint stores for one linear (besides ``bias``).
    exports: export target -> None (supported, subject to the exporter's own checks) or the reason
        it is not; targets missing from the mapping are refused with a generic reason.
    zero_rows_exact: an all-zero row quantizes to exact zeros (--pad-mlp's padded gate/up rows must).
    """

    name: ClassVar[str]
    bits: ClassVar[tuple[int, ...]]
    solver: ClassVar[str]
    stackable: ClassVar[bool]
    tensor_keys: ClassVar[tuple[str, ...]]
    exports: ClassVar[dict[str, str | None]] = {}
    zero_rows_exact: ClassVar[bool] = True
    default_bits: ClassVar[int] = 3

    # -- configuration ------------------------------------------------------------------------
    def validate(self, grid: GridConfig) -> None:
        """Raise ConfigError when ``grid`` asks for something this format cannot store."""
        if grid.bits in self.bits:
            return
        widths = ", ".join(str(b) for b in self.bits)
        lo, hi = min(self.bits), max(self.bits)
        if not lo <= grid.bits <= hi:
            raise ConfigError(
                f"--bits {grid.bits} is outside {lo}..{hi}: pick one of {widths} for the {self.name} grid"
            )
        lower = max(b for b in self.bits if b < grid.bits)
        upper = min(b for b in self.bits if b > grid.bits)
        raise ConfigError(
            f"--bits {grid.bits} cannot be stored by the {self.name} grid, which packs {widths} bits per weight "
            f"(no packed layout for {grid.bits}): use --bits {lower} or --bits {upper}"
        )

    def check_width(self, grid: GridConfig, in_features: int, name: str = "") -> None:
        """Raise ConfigError when a layer of input width ``in_features`` cannot be stored."""
        grid.check_width(in_features, name)

    # -- solving ------------------------------------------------------------------------------
    def ops(self, grid: GridConfig, device: torch.device, kernels: str = "auto") -> ScalarOps:
        """The scalar operations of a GPTQ format (LDLQ formats raise)."""
        raise NotImplementedError(f"the {self.name} grid is solved by {self.solver}, not GPTQ")

    def rtn(
        self, W: torch.Tensor, grid: GridConfig, kernels: str = "auto"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Round to nearest: codes, scale, zero, W_hat (float32)."""
        raise NotImplementedError

    # -- storage ------------------------------------------------------------------------------
    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
        """W_hat (out, in) float32 from unpacked codes and their parameters — the one formula of the
        format, used by the solvers' W_hat, the checkpoint, the modules and the exporters."""
        raise NotImplementedError

    def dequantize_result(self, res: QuantResult, grid: GridConfig) -> torch.Tensor:
        """W_hat of a solver result, equal bit for bit to the solver's own W_hat."""
        return self.dequantize(res.codes, res.scale, res.zero, grid.bits)

    def stored_tensors(self, res: QuantResult, grid: GridConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of one linear (keys :attr:`tensor_keys`; the bias is added by the caller)."""
        raise NotImplementedError

    def empty_module(
        self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool, dtype: torch.dtype
    ) -> nn.Module:
        """A skeleton module of this format, to be filled by ``load_state_dict``."""
        raise NotImplementedError

    def from_result(
        self, res: QuantResult, grid: GridConfig, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> nn.Module:
        """The module that runs a solver result (its buffers are :meth:`stored_tensors`)."""
        cols = res.weight.shape[1] if res.weight is not None else None
        if cols is None:
            raise ValueError("from_result needs the result's W_hat to know the input width")
        module = self.empty_module(cols, res.codes.shape[0], grid.bits, grid.group_size, bias is not None, dtype)
        state = self.stored_tensors(res, grid, dtype)
        if bias is not None:
            state["bias"] = bias.detach().to(dtype)
        module.load_state_dict(state)
        return module

    # -- inference and export -----------------------------------------------------------------
    def backends(self) -> tuple[str, ...]:
        """Names of the kernel backends registered for this format (rsq/kernels/backends.py),
        highest priority first; the format's file registers them."""
        return tuple(b.name for b in backends_for(self.name))

    def check_export(self, target: str, bits: int) -> None:
        """Raise ExportError when this format (at ``bits``) cannot be written as ``target``."""
        if target not in self.exports:
            raise ExportError(f"the {self.name} grid has no {target} export: re-quantize with --grid uniform")
        reason = self.exports[target]
        if reason is not None:
            raise ExportError(reason)


_REGISTRY: dict[str, NumberFormat] = {}


def register_format(fmt: NumberFormat) -> NumberFormat:
    """Add a format to the registry (replacing one of the same name); returns it."""
    _REGISTRY[fmt.name] = fmt
    return fmt


def format_names() -> tuple[str, ...]:
    _load_builtin()
    return tuple(_REGISTRY)


def get_format(name: str) -> NumberFormat:
    """The registered format called ``name``; ConfigError listing the valid names otherwise."""
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown grid {name!r}: choose one of {', '.join(_REGISTRY)}") from None


def _load_builtin() -> None:
    """Import the built-in formats once (whatever a caller imported first: a format module imported
    directly registers only itself), then order the registry as BUILTIN, other formats after."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    import importlib

    for module in BUILTIN:
        importlib.import_module(module)
    rank = {m: i for i, m in enumerate(BUILTIN)}
    ordered = sorted(_REGISTRY.items(), key=lambda kv: rank.get(type(kv[1]).__module__, len(BUILTIN)))
    _REGISTRY.clear()
    _REGISTRY.update(ordered)


_BUILTIN_LOADED = False
BUILTIN = ("rsq.formats.uniform", "rsq.formats.nf", "rsq.formats.e8p")  # registered on first use, in this order
