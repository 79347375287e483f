"""Online rotations: transforms applied to a linear layer's input at run time (the runtime half of
rsq/rotation: rotate.py fuses the offline half into the weights, this module attaches the rest).

A rotation site is described as data (:class:`OnlineRotation`), recorded in the checkpoint, and
attached to a linear (``nn.Linear`` or ``QuantLinear``) as a child module plus a forward pre-hook,
so parameter names are unchanged and forward hooks (Hessian collection) see the rotated input.

kinds:
* ``full``: x <- H_n x over the whole last dim (n = in_features; down_proj input).
* ``cross_head``: x viewed as (heads, head_dim) <- (H_heads ⊗ I_head_dim) x (before o_proj).
* ``block``: x <- (I ⊗ H_b/√b) x, the Hadamard H_b of rsq/rotation/hadamard.py's ``hadamard_matrix``
  on each contiguous block of b = ``head_dim`` features (the ``--online-rotations export`` down_proj
  site). b a power of two (the default): Sylvester's H_b, what compressed-tensors' ``hadamard``
  transform with ``head_dim=b`` applies (vLLM: Hadacore); any other order (``--export-block``):
  H_K ⊗ sylvester, exported with its matrix stored and applied by the engines as a dense GEMM per
  block. Always the torch transform (rsq/kernels/hadamard.py), never the Triton kernel.
* ``random_full`` / ``random_cross_head``: the same with a seeded random orthogonal matrix, the
  explicit fallback where no Hadamard of the order exists.

Hadamard kinds with bf16/fp16 inputs on CUDA run the Triton kernel of rsq/kernels/triton_hadamard.py
(one read and one write of the activations) where it supports the size; else the torch transform
(the choice: rsq/kernels/hadamard.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from rsq.kernels import ops
from rsq.kernels.hadamard import cross_head, hadamard_rotate
from rsq.rotation.hadamard import random_orthogonal

# the kinds an OnlineRotation applies at run time; a checkpoint's rotation record also lists
# "per_head" (fused into v_proj/o_proj) and "skipped" sites, which need nothing at run time
RUNTIME_KINDS = ("full", "cross_head", "block", "random_full", "random_cross_head")


@dataclass(frozen=True)
class OnlineRotation:
    module: str  # path inside a decoder layer, e.g. "mlp.down_proj"
    kind: str  # full | cross_head | block | random_full | random_cross_head
    size: int  # order of the orthogonal matrix
    head_dim: int = 1  # cross_head: width of each head block; block: the Hadamard block size
    seed: int = 0  # random_* kinds: seed of the matrix

    def to_dict(self) -> dict:
        return asdict(self)


class OnlineRotationModule(nn.Module):
    """Applies an :class:`OnlineRotation` to the last dim of its input. No persistent state."""

    def __init__(self, spec: OnlineRotation):
        super().__init__()
        self.spec = spec
        if spec.kind.startswith("random"):
            # a plain attribute, not a buffer: model.to(bfloat16) must not round the orthogonal
            # matrix; it is kept in float64 and applied in float32 (float64 for float64 inputs)
            self.matrix = random_orthogonal(spec.size, spec.seed)
        else:
            self.matrix = None

    def _rotate_last(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        m = self.matrix.to(x.device, work)
        return (x.to(work) @ m.T).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matrix is None:
            if torch.compiler.is_compiling():  # one opaque op in the graph (rsq/kernels/ops.py)
                return ops.hadamard(x, self.spec.kind, self.spec.size, self.spec.head_dim)
            return hadamard_rotate(x, self.spec.kind, self.spec.size, self.spec.head_dim)
        if self.spec.kind.endswith("cross_head"):
            return cross_head(x, self.spec.size, self.spec.head_dim, self._rotate_last)
        return self._rotate_last(x)

    def extra_repr(self) -> str:
        return f"kind={self.spec.kind}, size={self.spec.size}, head_dim={self.spec.head_dim}"


def _pre_hook(module: nn.Module, args):
    return (module.online_rotation(args[0]),) + tuple(args[1:])


def module_input(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What ``linear`` computes on when called with ``x``: x after its online rotation, if any."""
    rotation = getattr(linear, "online_rotation", None)
    return x if rotation is None else rotation(x)


def attach_online_rotation(linear: nn.Module, spec: OnlineRotation) -> None:
    """Make ``linear`` rotate its input by ``spec`` before computing (idempotent per module)."""
    if hasattr(linear, "online_rotation"):
        raise RuntimeError(f"{spec.module} already has an online rotation")
    linear.online_rotation = OnlineRotationModule(spec)
    linear.register_forward_pre_hook(_pre_hook)
