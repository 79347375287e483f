"""Progress without a terminal (issue 32): one line per finished layer and per evaluated source when
stderr is not a terminal (as under pytest's capture, nohup or a scheduler), JSON lines on request,
nothing with --quiet, and the bars (no lines) on a terminal."""

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rsq.cli import progress
from rsq.cli.main import main

FAST = ("--nsamples", "2", "--seqlen", "32", "--ppl-seqlen", "32", "--max-windows", "2", "--bits", "3")
LAYER = re.compile(
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] layer (\d+)/(\d+) done in [\d.]+(?:s|m\d\ds) \((.*)\); "
    r"worst rel loss (\S+) \((\S+)\); elapsed \S+, ETA \S+; peak host [\d.]+ GiB$"
)
EVAL = re.compile(r"^\[[^]]+\] perplexity wikitext2 ([\d.]+) \((\d+) windows of (\d+) tokens, \S+\)$")


@pytest.fixture
def llama(tiny_model_dir, capsys):
    d = str(tiny_model_dir("llama"))
    capsys.readouterr()
    return d


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    progress.configure("bars")


def _quantize(llama, out, *extra, method="gptq"):
    return main(["quantize", llama, "--method", method, *FAST, "--out", str(out), *extra])


def test_a_line_per_layer_and_per_source_without_a_terminal(llama, tmp_path, capsys):
    assert _quantize(llama, tmp_path / "o") == 0
    err = capsys.readouterr().err.splitlines()
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    layers = [LAYER.match(line) for line in err if " layer " in line]
    assert all(layers) and [int(m.group(1)) for m in layers] == list(range(1, res["num_layers"] + 1)), err
    assert {int(m.group(2)) for m in layers} == {res["num_layers"]}
    for m, rec in zip(layers, res["layers"]):
        stages = dict(s.rsplit(" ", 1) for s in m.group(3).split(", "))
        assert {"hessian", "solve", "propagate"} <= set(stages), stages
        worst = max(rec["rel_losses"], key=rec["rel_losses"].get)
        assert m.group(5) == worst and float(m.group(4)) == pytest.approx(rec["rel_losses"][worst], rel=1e-2)
    assert "capture" in layers[0].group(3)  # the layer-0 inputs are billed to the first layer
    evals = [EVAL.match(line) for line in err if "perplexity" in line]
    assert len(evals) == 1 and evals[0], err
    assert float(evals[0].group(1)) == pytest.approx(res["perplexity"]["wikitext2"], abs=0.006)
    assert (int(evals[0].group(2)), int(evals[0].group(3))) == (2, 32)


def test_json_lines(llama, tmp_path, capsys):
    assert _quantize(llama, tmp_path / "o", "--log-format", "json") == 0
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]  # every line is JSON
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["event"] for r in records] == ["layer"] * res["num_layers"] + ["eval"]
    assert [r["layer"] for r in records[:-1]] == list(range(1, res["num_layers"] + 1))
    assert records[-1]["perplexity"] == res["perplexity"]["wikitext2"] and records[-1]["windows"] == 2
    last = records[-2]
    assert last["eta_s"] == 0 and last["elapsed_s"] >= records[0]["elapsed_s"] and last["host_peak_GiB"] > 0
    assert set(last) >= {"time", "seconds", "stages", "worst_rel_loss", "worst_module", "gpu_peak_GiB"}


def test_quiet_and_terminal_print_no_lines(llama, tmp_path, capsys, monkeypatch):
    assert _quantize(llama, tmp_path / "q", "--quiet") == 0
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "_stderr_isatty", lambda: True)  # a terminal: the bars, no lines
    assert _quantize(llama, tmp_path / "t") == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert progress.choose_mode(isatty=True) == "bars" and progress.choose_mode(isatty=False) == "text"
    assert progress.choose_mode(True, "json", isatty=False) == "quiet"


def test_rtn_relative_loss_is_the_relative_weight_error(llama, tmp_path, capsys):
    """The logged relative loss against an independent oracle: for RTN it is ||W_hat - W||^2 / ||W||^2,
    W from the source model's file, W_hat the saved checkpoint's weight as rsq eval loads it."""
    from rsq.io.hf import load_any

    assert _quantize(llama, tmp_path / "o", "--log-format", "json", method="rtn") == 0
    first = json.loads(capsys.readouterr().err.splitlines()[0])
    name = first["worst_module"]
    src = {}
    for f in sorted(Path(llama).glob("*.safetensors")):
        src.update(load_file(str(f)))
    w = src[f"model.layers.0.{name}.weight"].double()
    net = load_any(str(tmp_path / "o"))[0]
    w_hat = net.get_submodule(f"model.layers.0.{name}").dequantize_weight().double()
    expected = float(((w_hat - w) ** 2).sum() / (w**2).sum())
    assert 0 < first["worst_rel_loss"] == pytest.approx(expected, rel=1e-3)
