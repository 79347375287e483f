"""Sibling projections as one GEMM: q/k/v (and gate/up) of a loaded rsq model read the same input,
so they can be one quantized matmul on their concatenated packed weights (7 -> 4 GEMM launches per
Llama layer; at one token each launch reads little and costs mostly its fixed overhead).

:func:`fuse_siblings` concatenates each group's packed buffers along the output dim (codes rows,
scales, zero points, biases) into one uniform-format layer and makes every member's buffers
row-slice *views* of those (contiguous): no extra weight memory, and ``state_dict`` /
``save_pretrained`` give the same tensors and files (the views are what they were). transformers'
attention and MLP forwards are not replaced: the member called first computes the fused product,
returns its slice and keeps the others' slices for the same input tensor; each sibling called with
that very tensor (``is``, and in eager mode the same in-place version) takes its slice. A sibling
called with another tensor computes its own product from its view buffers and switches the group
off (a warning: this model does not call its siblings on one input). Everything is plain Python over
the modules, so it traces under ``torch.compile(fullgraph=True)``; the fused buffers are marked as
static addresses (a CUDA graph reads them in place).

Groups are the model adapter's sequential groups of more than one linear (rsq/models/adapter.py:
"members of a group read the same input"), fused where their members are all quantized linears
(uniform format, one class) with equal bits, group size, in_features, dtype, device, forced backend and dense
mode, all or none with a bias, and no online rotation or other forward pre-hook on their input
(o_proj and down_proj carry the rotations; q/k/v and gate/up normally carry none). The fused layer
is an instance of the members' class (the uniform format's ``QuantLinear``), so it runs on the
format's kernel backends as any layer does (humming, Triton GEMV, reference).

:func:`unfuse` gives every member its own buffers again (clones of the views). Moving or casting a
fused model (``model.to``) copies each buffer separately, which breaks the views: the next eager
call notices, warns and switches the group off (fuse again after moving the model).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from rsq.models.registry import ADAPTERS, resolve

FUSED_ATTR = "sibling"  # QuantizedLinear attribute: (SiblingGroup, index) or None


class SiblingGroup:
    """Linears of one layer that read the same input, computed as one uniform-format GEMM.

    ``fused``: a layer of the members' class over the concatenated buffers (not a child of any
    module, so it adds nothing to the state dict); ``members``: the modules, whose buffers are row slices of
    ``fused``'s; ``active``: False once the group was switched off."""

    def __init__(self, names: tuple[str, ...], members: list[nn.Module], fused: nn.Module):
        self.names = names
        self.members = members
        self.fused = fused
        self.sizes = [m.out_features for m in members]
        self.active = True
        self.misses = 0  # products computed for siblings that never took them
        self._x: torch.Tensor | None = None  # the input of the pending product
        self._version = -1
        self._outs: list[torch.Tensor | None] | None = None  # its slices not taken yet
        self._left = 0

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s output for input ``x``: its slice of the fused product of ``x``."""
        compiling = torch.compiler.is_compiling()
        outs = self._outs
        if outs is not None and self._x is x and outs[index] is not None and (compiling or x._version == self._version):
            y = outs[index]
            outs[index] = None
            self._left -= 1
            if self._left == 0:
                self._x = self._outs = None  # the last sibling took its slice: hold nothing
            return y
        if outs is not None:  # a pending product some sibling never took: not called on one input
            self.misses += 1
            self._x = self._outs = None
            if not compiling:
                return self._switch_off(index, x, "its siblings were called on different inputs")
        if not compiling and not self.intact():
            return self._switch_off(index, x, "the model was moved or its buffers replaced after fusing")
        parts = list(self.fused(x).split(self.sizes, dim=-1))
        y = parts[index]
        parts[index] = None
        self._x, self._outs, self._left = x, parts, len(parts) - 1
        if not compiling:
            self._version = x._version
        return y

    def intact(self) -> bool:
        """Whether every member's buffers are still the row slices of the fused buffers."""
        for name, fused in self.fused.named_buffers(recurse=False):
            ptr, row = fused.data_ptr(), fused.stride(0) * fused.element_size()
            for member, size in zip(self.members, self.sizes):
                own = getattr(member, name)
                if own is None or own.data_ptr() != ptr or own.dtype != fused.dtype or own.device != fused.device:
                    return False
                ptr += size * row
        return True

    def _switch_off(self, index: int, x: torch.Tensor, why: str) -> torch.Tensor:
        from rsq.kernels import humming_backend

        self.active = False
        humming_backend.forget(*self.fused.buffers())
        self.fused = None  # the members' buffers are their own now (copied by the move) or still views
        warnings.warn(
            f"fused {'/'.join(self.names)} switched off ({why}): each computes its own product; "
            "call rsq.generation.fuse_siblings(model) again after moving the model",
            stacklevel=3,
        )
        return self.members[index].forward(x)


@dataclass
class FusionReport:
    """What :func:`fuse_siblings` did: ``fused`` "layer i: q_proj+k_proj+v_proj" groups (this call's
    and those fused before), ``skipped`` the groups left alone with the reason."""

    fused: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _candidates(model: nn.Module) -> list[tuple[int, tuple[str, ...], list[nn.Module]]]:
    adapter = resolve(model)
    out = []
    for i, layer in enumerate(adapter.get_layers(model)):
        for group in adapter.groups:
            if len(group) > 1:
                names = tuple(sorted(group, key=_call_order))
                out.append((i, names, [layer.get_submodule(n) for n in names]))
    return out


def _call_order(name: str) -> int:
    """q, k, v, gate, up first in transformers' call order (any order computes the same)."""
    leaf = name.rsplit(".", 1)[-1]
    order = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    return order.index(leaf) if leaf in order else len(order)


def _why_not(members: list[nn.Module]) -> str | None:
    from rsq.nn.linear import QuantizedLinear  # (rsq.kernels: torch's compiler stack, at first use)

    if not all(isinstance(m, QuantizedLinear) and m.format_name == "uniform" for m in members):
        return "not all uniform-format quantized linears"
    if len({type(m) for m in members}) > 1:
        return "different module classes"
    first = members[0]
    for what in ("bits", "group_size", "in_features", "backend", "dense_cache"):
        if len({getattr(m, what) for m in members}) > 1:
            return f"different {what}"
    if len({(m.scales.dtype, m.qweight.device) for m in members}) > 1:
        return "different dtype or device"
    if len({m.bias is None for m in members}) > 1:
        return "bias on some members only"
    if any(hasattr(m, "online_rotation") or m._forward_pre_hooks for m in members):
        return "an online rotation or a forward pre-hook on the input"
    groups = {id(s[0]) if s is not None else None for s in (getattr(m, FUSED_ATTR, None) for m in members)}
    if groups != {None} and (len(groups) > 1 or getattr(first, FUSED_ATTR)[0].members != members):
        return "fused in another group"
    return None


def _fuse(names: tuple[str, ...], members: list[nn.Module]) -> SiblingGroup:
    from rsq.kernels import humming_backend

    first = members[0]
    total = sum(m.out_features for m in members)
    has_bias = first.bias is not None
    fused = type(first)(
        first.in_features, total, first.bits, first.group_size, has_bias, first.scales.dtype, device="meta"
    )
    fused.backend, fused.dense_cache = first.backend, first.dense_cache
    keys = ("qweight", "scales", "qzeros") + (("bias",) if has_bias else ())
    old = [tuple(getattr(m, k) for k in keys) for m in members]
    for k in keys:
        whole = torch.cat([getattr(m, k) for m in members], dim=0)
        torch._dynamo.mark_static_address(whole)  # a CUDA graph reads it in place, never copies it
        setattr(fused, k, whole)
        offset = 0
        for m in members:
            n = m.out_features
            setattr(m, k, whole[offset : offset + n])  # contiguous row slice: a view, no new memory
            offset += n
    group = SiblingGroup(names, members, fused)
    for i, m in enumerate(members):
        m.dense_weight_cache = None  # the fused layer caches the group's W_hat instead
        setattr(m, FUSED_ATTR, (group, i))
    humming_backend.forget(*(t for bufs in old for t in bufs))  # the members' converted copies
    return group


def fuse_siblings(model: nn.Module) -> FusionReport:
    """Fuse the sibling projections of every decoder layer of ``model`` (a model from ``rsq.load``;
    its family must be one rsq supports) in place, where they qualify (module docstring); groups
    fused before stay fused (idempotent). Returns a :class:`FusionReport`. Undo: :func:`unfuse`."""
    report = FusionReport()
    for i, names, members in _candidates(model):
        label = f"layer {i}: {'+'.join(n.rsplit('.', 1)[-1] for n in names)}"
        why = _why_not(members)
        if why is not None:
            report.skipped.append(f"{label} ({why})")
            continue
        sibling = getattr(members[0], FUSED_ATTR, None)
        if sibling is not None and not sibling[0].active:  # switched off: fuse anew
            _unfuse_group(sibling[0])
            sibling = None
        if sibling is None:
            with torch.no_grad():
                _fuse(names, members)
        report.fused.append(label)
    return report


def fusable(model: nn.Module) -> bool:
    """Whether ``model`` has quantized linears and a family rsq knows (what :func:`fuse_siblings`
    needs; rsq's decode loop fuses such models only)."""
    from rsq.nn.linear import QuantizedLinear

    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ADAPTERS:
        return False
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def groups(model: nn.Module) -> list[SiblingGroup]:
    """The sibling groups of ``model`` fused now (active or switched off), each once."""
    seen: dict[int, SiblingGroup] = {}
    for m in model.modules():
        sibling = getattr(m, FUSED_ATTR, None)
        if sibling is not None:
            seen.setdefault(id(sibling[0]), sibling[0])
    return list(seen.values())


def _unfuse_group(group: SiblingGroup) -> None:
    from rsq.kernels import humming_backend

    with torch.no_grad():
        for m in group.members:
            for name, buf in list(m.named_buffers(recurse=False)):
                if buf is not None:
                    setattr(m, name, buf.clone())  # its own storage again
            setattr(m, FUSED_ATTR, None)
    if group.fused is not None:
        humming_backend.forget(*group.fused.buffers())
    group.fused = None
    group.members = []
    group.active = False


def unfuse(model: nn.Module) -> int:
    """Undo :func:`fuse_siblings`: every member gets its own buffers (copies of its slices; the
    fused buffers are freed with the last reference) and computes alone. Returns the groups undone."""
    found = groups(model)
    for group in found:
        _unfuse_group(group)
    return len(found)
