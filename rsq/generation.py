"""Settings for fast decoding with transformers' ``generate``: a static KV cache and a compiled
decode step.

Eager decoding of a loaded model is bound by Python (about 35 ms per step for an 8B model on an
H200, against 2-4 ms of kernel time: bench/NOTES-kernels.md). With
``cache_implementation="static"`` the cache has fixed shapes, so transformers compiles the decode
step (prefill stays eager) with ``torch.compile``; ``mode="reduce-overhead"`` then replays it as a
CUDA graph. rsq's modules trace without graph breaks because their kernels are custom ops
(rsq/kernels/ops.py). Greedy tokens equal the eager path's
(tests/integration/test_export.py::test_compiled_static_cache_generation_matches_eager).
"""

from __future__ import annotations

from typing import Any

import torch


def decode_kwargs(
    device: torch.device | str,
    compile: bool,
    *,
    backend: str = "inductor",
    fullgraph: bool = False,
) -> dict[str, Any]:
    """Keyword arguments for ``model.generate``: static cache + compiled decode step when
    ``compile`` (CUDA graphs on CUDA; on other devices transformers compiles only when told to,
    which this does), else {} (transformers' default dynamic cache, eager)."""
    if not compile:
        return {}
    from transformers import CompileConfig

    cuda = torch.device(device).type == "cuda"
    config = CompileConfig(fullgraph=fullgraph, backend=backend, mode="reduce-overhead" if cuda else None)
    if not cuda:
        config._compile_all_devices = True  # transformers' switch for compiling off CUDA
    return dict(cache_implementation="static", compile_config=config)


def compile_by_default(device: torch.device | str) -> bool:
    """Whether ``rsq generate`` compiles when neither --compile nor --no-compile is given: not yet.
    The compiled path is checked on the CPU (tests/unit/test_compile.py: no graph breaks, tokens equal
    to eager) but has not run on a GPU, where it is meant to become the default once measured
    (issue 21); on a CPU compiling takes longer than a short generation saves."""
    return False
