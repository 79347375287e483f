"""The inputs each sequential group of a decoder layer sees, batch by batch, and the layer's output,
with the work shared between the passes.

Generic path: every group's pass runs the layer from its input until it calls one of the group's
modules (rsq.calib.capture.forward_until), and propagation runs the whole layer. For the o, MLP-in
and down groups that repeats the attention (q/k/v projections, RoPE, SDPA) three more times over all
calibration tokens.

Pre-norm residual blocks (adapter.prenorm_residual: Llama, Mistral, Qwen2)::

    h = x + o_proj(attn(attn_norm(x)));   out = h + mlp(mlp_norm(h))

let one buffer carry the work forward: the o pass stores o_proj's input (the attention output, which
no longer changes once q/k/v are quantized); the MLP-in pass replaces it by h = x + o_proj(that),
with o_proj now quantized; the down pass and the propagation start from h. Where a second buffer
of the MLP's width fits (``down_cache``, the first K sequences where not all of them fit), the
down pass also keeps down_proj's input act(gate(n)) * up(n) (gate and up are final by then) and the
propagation of those sequences is h + down_proj(that): their gate and up products are not computed
twice. Every tensor is computed
by the same modules in the same order as the layer's own forward, so the result is the same; the
first use in a run is still checked against the generic path on one batch, and a block that does
not match (e.g. a model type whose layer has extra norms) falls back to the generic path for the
rest of the run with a warning.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch
from torch import nn

from rsq.calib.capture import ActivationStore, forward_until, layer_forward
from rsq.models.adapter import ModelAdapter
from rsq.rotation.online import module_input

log = logging.getLogger(__name__)


class LayerPasses:
    """Per run: ``begin(layer)`` for each layer, then ``group_inputs`` for its groups in order and
    ``output`` for the propagation. ``cache``: an (N, T, hidden) buffer like the activation store,
    or None for the generic path."""

    def __init__(
        self,
        adapter: ModelAdapter,
        store: ActivationStore,
        kwargs: dict,
        batch_size: int,
        cache: ActivationStore | None,
        down_cache: ActivationStore | None = None,
    ):
        self.adapter = adapter
        self.store = store
        self.kwargs = kwargs
        self.bs = batch_size
        self.cache = cache
        self.down_cache = down_cache if cache is not None else None
        self.checked = {"mlp_in": False, "output": False}
        self.layer = None
        self.state = None  # what the cache holds for the current layer: None, "attn" or "resid"
        self.down_ready = False  # down_cache holds down_proj's inputs for the current layer

    def begin(self, layer: nn.Module) -> None:
        self.layer = layer
        self.state = None
        self.down_ready = False

    @property
    def reusing(self) -> bool:
        return self.cache is not None

    def _sub(self, path: str) -> nn.Module:
        return self.layer.get_submodule(path)

    def _mlp(self) -> nn.Module:
        return self._sub(self.adapter.down_proj.rsplit(".", 1)[0])

    def group_inputs(self, group: tuple[str, ...]) -> Iterator[tuple[int, torch.Tensor]]:
        """(batch number, input of the group's first module) for every batch of sequences."""
        a_ = self.adapter
        first = self._sub(group[0])
        # the pass stops at whichever member the layer calls first (they read the same input)
        members = tuple(self._sub(name) for name in group)
        mlp_in = a_.up_proj in group or a_.gate_proj in group
        for k, (a, b) in enumerate(self.store.batches(self.bs)):
            x = None
            if self.reusing and group == (a_.o_proj,):
                raw = _until(self.layer, members, self.store.get(a, b), self.kwargs, raw=True)
                self.cache.set(a, b, raw)
                x = module_input(first, raw)
            elif self.reusing and self.state == "attn" and mlp_in:
                h = self.store.get(a, b) + self._sub(a_.o_proj)(self.cache.get(a, b))
                x = _until(self._mlp(), members, self._sub(a_.mlp_norm)(h), {})
                if not self.checked["mlp_in"] and not self._agrees(
                    x, _until(self.layer, members, self.store.get(a, b), self.kwargs), "the MLP input"
                ):
                    x = None
                else:
                    self.cache.set(a, b, h)
            elif self.reusing and self.state == "resid" and group == (a_.down_proj,):
                n = self._sub(a_.mlp_norm)(self.cache.get(a, b))
                if not self._down_kept(b):
                    x = _until(self._mlp(), members, n, {})
                else:  # kept for the propagation: down_proj called on it is the MLP's output
                    raw = _until(self._mlp(), members, n, {}, raw=True)
                    self.down_cache.set(a, b, raw)
                    x = module_input(first, raw)
            if x is None:
                x = _until(self.layer, members, self.store.get(a, b), self.kwargs)
            yield k, x
        if self.reusing:
            self.cache.check()  # NaN/Inf in what the next pass starts from: once per pass
            if group == (a_.down_proj,) and self.state == "resid" and self.down_cache is not None:
                self.down_cache.check()
                self.down_ready = True
            if group == (a_.o_proj,):
                self.state = "attn"
            elif self.state == "attn" and mlp_in:
                self.state = "resid"

    def output(self, a: int, b: int) -> torch.Tensor:
        """The layer's output for sequences a..b (its current weights)."""
        if self.reusing and self.state == "resid":
            h = self.cache.get(a, b)
            if self.down_ready and self._down_kept(b):  # the MLP's output from down_proj's kept input
                out = h + self._sub(self.adapter.down_proj)(self.down_cache.get(a, b))
            else:
                out = h + self._mlp()(self._sub(self.adapter.mlp_norm)(h))
            if self.checked["output"] or self._agrees(
                out, layer_forward(self.layer, self.store.get(a, b), self.kwargs), "the layer output", "output"
            ):
                return out
        return layer_forward(self.layer, self.store.get(a, b), self.kwargs)

    def _down_kept(self, stop: int) -> bool:
        """Whether the down cache holds sequences ..stop (it keeps the first K that fit)."""
        return self.down_cache is not None and stop <= len(self.down_cache)

    def _agrees(self, fast: torch.Tensor, generic: torch.Tensor, what: str, key: str = "mlp_in") -> bool:
        """First use in a run: the shared-work tensor against the generic path's. Both run the same
        modules in the same order, so they agree to rounding; a block of another form differs by
        O(1) (a missing norm, a scaled residual). Tolerance: 1e-2 of the tensor's scale."""
        self.checked[key] = True
        scale = generic.float().abs().max().clamp_min(1e-30)
        err = (fast.float() - generic.float()).abs().max()
        if err <= 1e-2 * scale:
            return True
        log.warning(
            "%s of a %s layer computed from the cached attention output differs from the layer's own "
            "forward (max |diff| %.3g of %.3g): not a pre-norm residual block; using full layer passes",
            what,
            self.adapter.name,
            err.item(),
            scale.item(),
        )
        self.cache.close()
        self.cache = None
        if self.down_cache is not None:
            self.down_cache.close()
            self.down_cache, self.down_ready = None, False
        return False


def _until(
    module: nn.Module, target: nn.Module | tuple[nn.Module, ...], x: torch.Tensor, kwargs: dict, raw: bool = False
) -> torch.Tensor:
    sink = []
    forward_until(module, target, x, kwargs, sink.append, raw=raw)
    return sink[0]
