"""The Python API and the CLI build the same run: same checkpoint bit for bit."""

import json

import torch
from safetensors.torch import load_file

import rsq
from rsq.cli.main import main
from rsq.config import RSQConfig


def test_python_for_method_equals_the_cli(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    opts = dict(nsamples=4, seqlen=32, bits=3)
    cli_out, py_out = tmp_path / "cli", tmp_path / "py"
    argv = ["quantize", str(model_dir), "--method", "rsq", "--out", str(cli_out), "--ppl", "none"]
    argv += ["--nsamples", str(opts["nsamples"]), "--seqlen", str(opts["seqlen"]), "--bits", str(opts["bits"])]
    assert main(argv) == 0
    cfg = RSQConfig.for_method(
        "rsq",
        model=str(model_dir),
        grid={"bits": opts["bits"]},
        calib={"nsamples": opts["nsamples"], "seqlen": opts["seqlen"]},
    )
    rsq.quantize(cfg, py_out, ppl_sources=())
    a, b = load_file(str(cli_out / "model.safetensors")), load_file(str(py_out / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith(".qweight") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    qa = json.loads((cli_out / "config.json").read_text())["quantization_config"]
    qb = json.loads((py_out / "config.json").read_text())["quantization_config"]
    assert qa["rsq_config"] == qb["rsq_config"]
    assert (
        qa["method"] == "rsq" and qa["rotation"] is not None and qa["rsq_config"]["importance"]["strategy"] == "attncon"
    )
