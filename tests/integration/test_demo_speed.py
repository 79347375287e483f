"""What made `rsq demo` faster without changing its table (issue 32): the GGUF is loaded and
dequantized once for all methods, and round-to-nearest computes no calibration activations."""

import json

import torch
from safetensors.torch import load_file

import rsq.cli.cmd_demo
import rsq.io.loading
import rsq.job.weights
from rsq.cli.main import main
from rsq.config import CalibConfig, GridConfig, RSQConfig, SolverConfig
from rsq.job.run import run_quantize


def test_rtn_computes_no_activations_and_rounds_the_source_weights(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    cfg = RSQConfig(
        model=str(src),
        method="rtn",
        grid=GridConfig(bits=3, mse_clip=False),
        solver=SolverConfig(algorithm="rtn"),
        calib=CalibConfig(nsamples=2, seqlen=32),
    )
    res = run_quantize(cfg, tmp_path / "o", ppl_sources=())
    stages = res["timings"]["stages"]
    assert "capture" not in stages and "propagate" not in stages and "solve" in stages, stages
    # oracle: symmetric per-row round-to-nearest of the source weight (levels -4..3, scale max|w|/3)
    w = load_file(str(next(src.glob("*.safetensors"))))["model.layers.1.mlp.down_proj.weight"].double()
    scale = w.abs().max(1, keepdim=True).values / 3
    expected = torch.clamp(torch.round(w / scale), -4, 3) * scale
    from rsq.io.hf import load_any

    net = load_any(str(tmp_path / "o"))[0]
    got = net.get_submodule("model.layers.1.mlp.down_proj").dequantize_weight().double()
    assert torch.allclose(got, expected, atol=1e-6, rtol=0), (got - expected).abs().max()


def test_demo_loads_the_model_once(tmp_path, capsys, monkeypatch):
    calls = []
    real = rsq.io.loading.load_model

    def counting(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    monkeypatch.setattr(rsq.io.loading, "load_model", counting)
    monkeypatch.setattr(rsq.job.weights, "load_model", counting)  # the job's own loader (imported by name)
    monkeypatch.setattr(rsq.cli.cmd_demo, "load_model", counting)  # the demo's (imported by name)
    argv = ["demo", "--methods", "fp16,fp16", "--max-windows", "1", "--out", str(tmp_path / "d")]  # fmt: skip
    assert main(argv) == 0
    assert len(calls) == 1
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert [r["method"] for r in summary] == ["fp16", "fp16"]
    # each run gets its own copy: the second evaluates the same weights as the first
    assert summary[0]["perplexity"]["wikitext2"] == summary[1]["perplexity"]["wikitext2"]
