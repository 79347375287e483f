"""Compiled decoding's defaults (rsq/generation/settings.py) and the step clock of `rsq generate` (CPU)."""

from __future__ import annotations

import pytest
import torch

from rsq import kernels
from rsq.cli.cmd_generate import StepClock
from rsq.generation import compile_by_default, decode_kwargs


def test_cpu_default_is_eager_dynamic_cache():
    assert compile_by_default("cpu") is False
    assert decode_kwargs("cpu") == {}
    assert decode_kwargs(torch.device("cpu"), None) == {}
    assert decode_kwargs("cuda", False) == {}


@pytest.mark.parametrize("triton", [True, False])
def test_cuda_default_compiles_when_triton_is_there(monkeypatch, triton):
    monkeypatch.setattr(kernels, "has_triton", lambda: triton)
    assert compile_by_default("cuda:0") is triton
    kw = decode_kwargs("cuda")
    if not triton:
        assert kw == {}
        return
    assert kw["cache_implementation"] == "static"
    assert kw["compile_config"].mode == "reduce-overhead"  # CUDA graphs
    assert not getattr(kw["compile_config"], "_compile_all_devices", False)


def test_compile_off_cuda_when_asked():
    kw = decode_kwargs("cpu", True)
    assert kw["cache_implementation"] == "static"
    assert kw["compile_config"].mode is None
    assert kw["compile_config"]._compile_all_devices is True


def test_max_cache_len_only_where_transformers_has_it():
    from transformers import GenerationConfig

    kw = decode_kwargs("cpu", True, max_cache_len=300)
    assert ("max_cache_len" in kw) == hasattr(GenerationConfig(), "max_cache_len")
    if "max_cache_len" in kw:
        assert kw["max_cache_len"] == 300
    assert "max_cache_len" not in decode_kwargs("cpu", True)


def test_step_clock_splits_warm_up_from_steady_rate():
    clock = StepClock()
    assert clock.summary() is None
    # prompt at 0, first token at 0.5 (prefill), first decode step at 10.5 (compile), then 0.01 s/token
    clock.times = [0.0, 0.5, 10.5] + [10.5 + 0.01 * i for i in range(1, 101)]
    text = clock.summary()
    assert "prefill + first token 0.50 s" in text
    assert "first decode step 10.0 s" in text
    assert "then 100.0 tokens/s" in text
