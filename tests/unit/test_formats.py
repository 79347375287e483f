"""Every registered number format, through the registry (rsq/formats/): a new format gets this
coverage by registering.

For each format: the format's dequantize equals the solver's W_hat bit for bit (its Hessian solver
and RTN); stored tensors -> its module -> dequantize_weight round-trips bit for bit; save -> load
-> logits match on a tiny model; the registry refuses unknown names listing the valid ones."""

from __future__ import annotations

import pytest
import torch

import rsq
from rsq.config import GridConfig, RSQConfig, SolverConfig
from rsq.errors import ConfigError, ExportError
from rsq.formats import format_names, get_format
from rsq.solver.gptq import gptq_quantize, rtn_result
from rsq.solver.ldlq import ldlq_quantize

FORMATS = format_names()


def _grids(name: str) -> list[GridConfig]:
    """Per channel and grouped, symmetric and not, for every width the format stores."""
    fmt = get_format(name)
    grids = []
    for bits in fmt.bits:
        grids.append(GridConfig(kind=name, bits=bits))
        if name != "e8p":
            grids.append(GridConfig(kind=name, bits=bits, group_size=16, symmetric=False))
    return grids


def _problem(rows=24, cols=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(4 * cols, cols, generator=g)
    return W, X.T @ X / X.shape[0]


def _solve(W, H, grid):
    fmt = grid.format
    if fmt.solver == "ldlq":
        return ldlq_quantize(W, H, grid, SolverConfig(algorithm="ldlq"))
    return gptq_quantize(W, H, grid, SolverConfig())


def test_builtin_formats_are_registered():
    assert set(FORMATS) >= {"uniform", "nf", "e8p"}


def test_unknown_format_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown grid 'int5'") as err:
        GridConfig(kind="int5")
    for name in FORMATS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", FORMATS)
def test_widths_outside_the_format_are_refused_up_front(name):
    fmt = get_format(name)
    for bits in range(1, 10):
        if bits in fmt.bits:
            GridConfig(kind=name, bits=bits)
        else:
            with pytest.raises(ConfigError, match=f"--bits {bits}"):
                GridConfig(kind=name, bits=bits)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("how", ["solver", "rtn"])
def test_format_dequantize_equals_the_solvers_w_hat(name, how):
    W, H = _problem(seed=len(name))
    for grid in _grids(name):
        res = _solve(W, H, grid) if how == "solver" else rtn_result(W, grid)
        assert torch.equal(grid.format.dequantize_result(res, grid), res.weight), grid
        # W_hat is close to W: a format whose formula drifted from its solver's would not be
        err = (res.weight - W).norm() / W.norm()
        assert err < 0.8, (grid, err)


@pytest.mark.parametrize("name", FORMATS)
def test_stored_tensors_module_round_trip(name):
    W, H = _problem(seed=3)
    bias = torch.randn(W.shape[0])
    for grid in _grids(name):
        fmt = grid.format
        res = _solve(W, H, grid)
        stored = fmt.stored_tensors(res, grid, torch.float32)
        assert set(stored) == set(fmt.tensor_keys)
        module = fmt.empty_module(W.shape[1], W.shape[0], grid.bits, grid.group_size, True, torch.float32)
        module.load_state_dict({**stored, "bias": bias})
        assert torch.equal(module.dequantize_weight(torch.float32), res.weight), grid
        x = torch.randn(5, W.shape[1])
        # module forward vs the float64 product of W_hat: float32 matmul rounding only
        ref = (x.double() @ res.weight.double().T + bias.double()).float()
        assert torch.allclose(module(x), ref, rtol=1e-5, atol=1e-5)
        again = fmt.from_result(res, grid, bias, torch.float32)
        for key, value in module.state_dict().items():
            assert torch.equal(again.state_dict()[key], value), key


@pytest.mark.parametrize("name", FORMATS)
def test_export_targets_are_answered(name):
    fmt = get_format(name)
    for target in ("compressed-tensors", "gptq", "no-such-format"):
        for bits in fmt.bits:
            try:
                fmt.check_export(target, bits)
            except ExportError as exc:
                assert "re-quantize" in str(exc) or "export --format" in str(exc), exc
            else:
                assert target in fmt.exports


@pytest.mark.parametrize("name", FORMATS)
def test_save_load_logits_match(name, tiny_model_dir, tmp_path):
    from rsq.io.loading import load_model
    from rsq.job.run import run_quantize

    model_dir = tiny_model_dir("llama")
    grid = GridConfig(kind=name, bits=get_format(name).default_bits)
    cfg = RSQConfig.for_method("gptq", model=str(model_dir), grid=grid, calib={"nsamples": 4, "seqlen": 32})
    model, tok = load_model(str(model_dir))
    run_quantize(cfg, tmp_path / "q", ppl_sources=(), preloaded=(model, tok))
    loaded, _ = rsq.load(tmp_path / "q")
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    # the same weights (bitwise, tested above); only the float32 matmul order of the modules differs
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (a - b).abs().max()


def test_builtin_formats_registered_whatever_is_imported_first():
    """A format module imported directly registers itself first; the registry still lists every
    built-in format, in BUILTIN's order (this failed when the registry loaded builtins only if empty)."""
    import subprocess
    import sys

    code = "import rsq.formats.e8p\nfrom rsq.formats import format_names\nprint(','.join(format_names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "uniform,nf,e8p", out
