"""Settings for fast decoding with transformers' ``generate``: a static KV cache and a compiled
decode step, the default on a CUDA GPU.

Eager decoding of a loaded model is bound by Python (about 35 ms per step for an 8B model on an
H200, against 2-4 ms of kernel time: bench/NOTES-kernels.md). With
``cache_implementation="static"`` the cache has fixed shapes, so transformers compiles the decode
step (prefill stays eager) with ``torch.compile``; ``mode="reduce-overhead"`` then replays it as a
CUDA graph. rsq's modules trace without graph breaks because their kernels are custom ops
(rsq/kernels/ops.py). Greedy tokens equal the eager path's
(tests/integration/test_export.py::test_compiled_static_cache_generation_matches_eager).

Measured on one H100 with an 8B-shaped checkpoint (issue 29): static cache + compile is 8-10x the
tokens/s of eager decoding, bf16 and rsq alike; bench/generate_speed.py measures it. The first
``generate`` call of each batch size pays the compilation and the CUDA-graph capture (tens of
seconds for an 8B model); later calls of the same shapes reuse them.

For your own ``generate`` calls on a model from ``rsq.load``::

    out = model.generate(**inputs, max_new_tokens=128, **rsq.decode_kwargs(model.device))

(``decode_kwargs(device, False)`` or ``{}`` keeps transformers' eager dynamic-cache path.)
"""

from __future__ import annotations

from typing import Any

import torch


def decode_kwargs(
    device: torch.device | str,
    compile: bool | None = None,
    *,
    backend: str = "inductor",
    fullgraph: bool = False,
    max_cache_len: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``model.generate``: static cache + compiled decode step when
    ``compile`` (None: :func:`compile_by_default` for ``device``; CUDA graphs on CUDA; on other
    devices transformers compiles only when told to, which this does), else {} (transformers'
    default dynamic cache, eager).

    ``max_cache_len``: size the static cache for the longest prompt + new tokens of a series of
    calls, so that calls with shorter prompts reuse one compiled step (transformers versions
    without this setting size the cache per call and recompile when it grows)."""
    if compile is None:
        compile = compile_by_default(device)
    if not compile:
        return {}
    from transformers import CompileConfig

    cuda = torch.device(device).type == "cuda"
    config = CompileConfig(fullgraph=fullgraph, backend=backend, mode="reduce-overhead" if cuda else None)
    if not cuda:
        config._compile_all_devices = True  # transformers' switch for compiling off CUDA
    out: dict[str, Any] = dict(cache_implementation="static", compile_config=config)
    if max_cache_len is not None and _has_max_cache_len():
        out["max_cache_len"] = int(max_cache_len)
    return out


def _has_max_cache_len() -> bool:
    from transformers import GenerationConfig

    return hasattr(GenerationConfig(), "max_cache_len")


def compile_by_default(device: torch.device | str) -> bool:
    """Whether generation compiles when the caller does not say: on a CUDA device, yes (inductor's
    GPU code needs Triton, which CUDA installs of torch carry); on a CPU, no (compiling takes longer
    than a short generation saves)."""
    if torch.device(device).type != "cuda":
        return False
    from rsq.kernels import has_triton

    return has_triton()
