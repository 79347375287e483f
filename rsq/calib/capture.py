"""Capture the first decoder layer's inputs, and hold calibration activations.

The model is run up to layer 0 for each batch of token windows; a forward pre-hook on layer 0
records the hidden states and the keyword arguments (rotary cos/sin, mask, positions) and stops the
forward with a private exception — the one place rsq uses an exception for control flow.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from rsq.errors import CalibrationError

_KEEP_KWARGS = ("attention_mask", "position_ids", "position_embeddings", "cache_position")


class _StopForward(Exception):
    pass


class ActivationStore:
    """(N, T, D) activations on the compute device, in host memory, or memory-mapped on disk.

    Layer propagation writes outputs back in place (sequences are independent), so one buffer
    serves the whole run. ``location``: "device", "cpu" or "disk". ``check_finite``: NaN/Inf
    written are an error at the next :meth:`check` (once per pass, not per batch); False: they are
    kept (evaluation hidden states, whose NaN becomes a NaN perplexity and its own error).
    """

    def __init__(
        self,
        n: int,
        t: int,
        d: int,
        dtype: torch.dtype,
        device: torch.device,
        location: str,
        check_finite: bool = True,
    ):
        self.shape = (n, t, d)
        self.check_finite = check_finite
        self._finite: torch.Tensor | None = None  # all values set since the last check() finite
        self.dtype = dtype
        self.device = torch.device(device)
        self.location = location
        self._tmp = None
        if location == "disk":
            self._tmp = tempfile.TemporaryDirectory(prefix="rsq-acts-")
            np_dtype = np.float32 if dtype in (torch.float32, torch.bfloat16, torch.float16) else np.float64
            # bf16 has no numpy dtype: keep 16-bit payloads as int16 views
            if dtype in (torch.bfloat16, torch.float16):
                np_dtype = np.int16
            self._np_dtype = np_dtype
            self.data = np.memmap(os.path.join(self._tmp.name, "acts.bin"), dtype=np_dtype, mode="w+", shape=self.shape)
        else:
            target = self.device if location == "device" else torch.device("cpu")
            pin = location == "cpu" and self.device.type == "cuda"
            self.data = torch.empty(self.shape, dtype=dtype, device=target, pin_memory=pin)

    def __len__(self) -> int:
        return self.shape[0]

    def get(self, start: int, stop: int) -> torch.Tensor:
        if self.location == "disk":
            raw = torch.from_numpy(np.array(self.data[start:stop]))
            t = raw.view(self.dtype) if self._np_dtype is np.int16 else raw.to(self.dtype)
            return t.to(self.device)
        return self.data[start:stop].to(self.device, non_blocking=True)

    def set(self, start: int, stop: int, value: torch.Tensor) -> None:
        """Write sequences start..stop. With ``check_finite`` NaN/Inf are noted on the device (no
        host sync per batch) and raised by :meth:`check`, which each filling pass calls once."""
        if self.check_finite:
            ok = torch.isfinite(value).all()
            self._finite = ok if self._finite is None else self._finite & ok
        if self.location == "disk":
            v = value.detach().to("cpu", self.dtype)
            self.data[start:stop] = (v.view(torch.int16) if self._np_dtype is np.int16 else v).numpy()
        else:
            self.data[start:stop].copy_(value.detach(), non_blocking=True)

    def check(self) -> None:
        """CalibrationError if a value written since the last check was NaN/Inf (one host sync)."""
        finite, self._finite = self._finite, None
        if finite is not None and not bool(finite):
            raise CalibrationError(
                "NaN/Inf in calibration activations: the model overflows in this dtype or its weights "
                "are corrupt; rerun with --dtype float32, or check the model files"
            )

    def batches(self, batch_size: int) -> Iterator[tuple[int, int]]:
        for start in range(0, len(self), batch_size):
            yield start, min(start + batch_size, len(self))

    def close(self) -> None:
        if self._tmp is not None:
            del self.data
            self._tmp.cleanup()
            self._tmp = None


def choose_location(requested: str, n: int, t: int, d: int, dtype: torch.dtype, device: torch.device) -> str:
    """auto: on the GPU if it uses under a quarter of free memory, else host memory."""
    if requested != "auto":
        return requested
    if torch.device(device).type != "cuda":
        return "cpu"
    need = n * t * d * torch.finfo(dtype).bits // 8
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if need < free / 4 else "cpu"


@contextmanager
def _catch_layer0(layer0: nn.Module, sink: dict) -> Iterator[None]:
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        sink["hidden"] = hidden
        sink["kwargs"] = {k: kwargs[k] for k in _KEEP_KWARGS if k in kwargs and kwargs[k] is not None}
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    return value


@torch.no_grad()
def capture_layer0_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    windows: torch.Tensor,
    store: ActivationStore,
    batch_size: int,
    device: torch.device,
    window_fn=None,
) -> dict:
    """Fill ``store`` with layer-0 inputs for every window; return the layer kwargs.

    Only the modules that run before layer 0 (embeddings, rotary) are moved to ``device``; the
    kwargs are captured from a one-sequence forward so they broadcast over any batch size.
    ``window_fn(i)`` (optional) returns window i on the fly instead of ``windows[i]`` (expansion).
    """
    n = len(store)
    get = window_fn or (lambda i: windows[i])
    moved = _move_pre_layer_modules(model, layers, device)
    sink: dict = {}
    kwargs: dict = {}
    try:
        with _catch_layer0(layers[0], sink):
            for start in range(0, n, batch_size):
                stop = min(start + batch_size, n)
                ids = torch.stack([get(i) for i in range(start, stop)]).to(device)
                if start == 0:
                    try:
                        model(input_ids=ids[:1], use_cache=False)
                    except _StopForward:
                        pass
                    kwargs = _to(sink["kwargs"], device)
                try:
                    model(input_ids=ids, use_cache=False)
                except _StopForward:
                    pass
                store.set(start, stop, sink["hidden"])
        store.check()
    finally:
        for module, original in moved:
            module.to(original)
    return kwargs


def _move_pre_layer_modules(model: nn.Module, layers: nn.ModuleList, device: torch.device):
    """Move every parameter/buffer holder outside the decoder layers and lm_head to ``device``."""
    layer_ids = {id(m) for layer in layers for m in layer.modules()}
    moved = []
    for name, module in model.named_modules():
        if id(module) in layer_ids or module is model or name.endswith("lm_head"):
            continue
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if own:
            moved.append((module, own[0].device))
            module.to(device)
    return moved


def forward_until(
    layer: nn.Module,
    module: nn.Module | tuple[nn.Module, ...],
    hidden: torch.Tensor,
    kwargs: dict,
    fn,
    raw: bool = False,
) -> None:
    """Run ``layer`` only until ``module`` is called; call ``fn(input)`` with its input.

    The input is what the module's forward sees (after any forward pre-hook such as an online
    rotation), or with ``raw`` what it is called with (before its pre-hooks). The module itself
    does not run: stopping early skips it and the rest of the layer, e.g. the whole MLP when
    collecting the q/k/v Hessian. ``layer`` may be any module (a layer, an MLP) and ``kwargs`` its
    keyword arguments. ``module`` may be several modules that read the same input (a sequential
    group, e.g. k, v, q): the forward stops at whichever the layer calls first, so none of them
    runs (stopping at k_proj alone would compute q_proj, which Llama's attention calls first).
    """
    modules = module if isinstance(module, (tuple, list)) else (module,)

    def hook(mod, args):
        fn(args[0])
        raise _StopForward

    handles = [m.register_forward_pre_hook(hook, prepend=raw) for m in modules]
    try:
        layer_forward(layer, hidden, kwargs)
    except _StopForward:
        return
    finally:
        for handle in handles:
            handle.remove()
    raise RuntimeError("the layer finished without calling the hooked module")  # internal invariant


def layer_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run one decoder layer; HF returns a tensor (>= 4.5x) or a tuple (older)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def rope_from_kwargs(kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = kwargs["position_embeddings"]
    return cos, sin
