"""The whole quantize job on tiny random models: outputs, resume, and every bad input's error."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rsq.cli.main import main
from rsq.config import CalibConfig, RSQConfig
from rsq.job.run import _Interrupted, partial_dir, run_quantize


def _cfg(model_dir, method="gptq", **kw):
    return RSQConfig.for_method(
        method,
        model=str(model_dir),
        grid={"bits": 3},
        calib={"nsamples": 4, "seqlen": 64},
        batch_size=3,
        **kw,
    )


def test_gptq_run_writes_complete_output(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    res = run_quantize(_cfg(tiny_model_dir("llama")), out, ppl_seqlen=64, ppl_max_windows=4)
    assert (out / "results.json").is_file() and (out / "config.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["seed"] == 0 and saved["config"]["grid"]["bits"] == 3
    assert len(saved["modules"]) == 2 * 7 and all(m["loss"] >= 0 for m in saved["modules"].values())
    assert set(saved["timings"]["stages"]) >= {"capture", "hessian", "solve", "propagate"}
    assert saved["gpu_peak_GiB"] == {}  # a CPU run records no GPU peaks
    assert saved["loss_outliers"] == []  # checked, none: 2 layers leave each module one peer, too few to judge
    assert "split by article" in saved["calibration"]["split"]
    assert res["perplexity"]["wikitext2"] > 1
    assert not partial_dir(out).exists()


def test_resume_after_kill_equals_uninterrupted(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("qwen2")
    cfg = _cfg(model_dir, method="quarot")
    full = tmp_path / "full"
    run_quantize(cfg, full, ppl_sources=())
    killed = tmp_path / "killed"
    with pytest.raises(_Interrupted):
        run_quantize(cfg, killed, ppl_sources=(), stop_after_layer=0)
    assert not killed.exists() and (partial_dir(killed) / "state.json").is_file()
    run_quantize(cfg, killed, ppl_sources=(), resume=True)
    a = load_file(str(next(full.glob("*.safetensors"))))
    b = load_file(str(next(killed.glob("*.safetensors"))))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_other_options_is_refused(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "r"
    with pytest.raises(_Interrupted):
        run_quantize(_cfg(model_dir), out, ppl_sources=(), stop_after_layer=0)
    rc = main(
        [
            "quantize",
            str(model_dir),
            "--method",
            "gptq",
            "--bits",
            "4",
            "--nsamples",
            "4",
            "--seqlen",
            "64",
            "--out",
            str(out),
            "--resume",
            "--ppl",
            "none",
        ]
    )
    assert rc == 2


def _cli(*args):
    return main(["quantize", *args])


def test_bad_inputs_give_one_line_errors(tiny_model_dir, tmp_path, capsys):
    model_dir = str(tiny_model_dir("llama"))
    out = str(tmp_path / "o")
    cases = [
        ((str(tmp_path / "missing"), "--out", out), "does not exist"),
        ((model_dir, "--bits", "9", "--out", out), "outside 2..8"),
        ((model_dir, "--bits", "1", "--out", out), "outside 2..8"),
        ((model_dir, "--group-size", "48", "--out", out), "does not divide"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    short = tmp_path / "short.txt"
    short.write_text("just a few words of text")
    cases += [
        ((model_dir, "--calib", str(empty), "--out", out), "empty"),
        ((model_dir, "--calib", str(short), "--seqlen", "64", "--out", out), "too few"),
    ]
    unknown = tmp_path / "gpt2"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    cases.append(((str(unknown), "--out", out), "not supported"))
    capsys.readouterr()  # drop what building the fixture printed (its save progress bar), not the CLI's
    for args, needle in cases:
        rc = _cli(*args, "--nsamples", "2", "--ppl", "none")
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2, (args, err)
        assert len(err) == 1 and err[0].startswith("rsq: error:") and needle in err[0], (args, err)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_nan_activations_are_reported(tiny_model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir("mistral")
    model = AutoModelForCausalLM.from_pretrained(src)
    model.model.embed_tokens.weight.data[:] = float("nan")
    bad = tmp_path / "nan-model"
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(src).save_pretrained(bad)
    rc = _cli(
        str(bad), "--method", "gptq", "--nsamples", "2", "--seqlen", "32", "--out", str(tmp_path / "o"), "--ppl", "none"
    )
    err = capsys.readouterr().err
    assert rc == 2 and "NaN/Inf" in err


def test_expansion_equals_explicit_rolled_copies():
    """expand=F (rolled windows made on the fly, disk-backed store) == F explicit rolled copies."""
    from rsq.config import ImportanceConfig
    from rsq.importance import expand_rolls
    from rsq.importance.layer import make_weight_fn
    from rsq.job.loop import quantize_layers
    from rsq.models.registry import resolve
    from tests.conftest import tiny_model

    windows = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(0))
    results = []
    for expand, wins in ((4, windows), (1, expand_rolls(windows, 4))):
        model = tiny_model("llama")
        cfg = RSQConfig(
            method="rsq",
            importance=ImportanceConfig(strategy="attncon", expand=expand),
            calib=CalibConfig(nsamples=wins.shape[0], seqlen=32),
            batch_size=4,
            device="cpu",
        )
        adapter = resolve(model)
        quantize_layers(model, cfg, wins, adapter=adapter, weight_fn=make_weight_fn(cfg, adapter, model.config, wins))
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in results[0]:
        assert torch.equal(results[0][k], results[1][k]), k


def test_grid_resumes_an_unfinished_cell(tiny_model_dir, tmp_path):
    from rsq.job.ablate import run_grid
    from rsq.job.run import can_resume

    cfg = _cfg(tiny_model_dir("llama"))
    ref = tmp_path / "ref"
    run_quantize(cfg, ref, ppl_sources=())
    grid = tmp_path / "grid"
    with pytest.raises(_Interrupted):
        run_quantize(cfg, grid / "cell", ppl_sources=(), stop_after_layer=0)
    assert can_resume(grid / "cell", cfg)
    assert not can_resume(grid / "cell", _cfg(tiny_model_dir("llama"), seed=1))  # other options: start over
    run_grid([("cell", cfg)], grid, ppl_max_windows=2, ppl_seqlen=64)
    saved = json.loads((grid / "cell" / "results.json").read_text())
    assert saved["resumed_after_layers"] == 1  # it continued, not restarted
    a = load_file(str(next(ref.glob("*.safetensors"))))
    b = load_file(str(next((grid / "cell").glob("*.safetensors"))))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resumed_rsq_run_keeps_every_importance_map(tiny_model_dir, tmp_path):
    from rsq.config import ImportanceConfig

    cfg = _cfg(tiny_model_dir("llama"), method="rsq", importance=ImportanceConfig(strategy="attncon"))
    run_quantize(cfg, tmp_path / "full", ppl_sources=())
    with pytest.raises(_Interrupted):
        run_quantize(cfg, tmp_path / "killed", ppl_sources=(), stop_after_layer=0)
    run_quantize(cfg, tmp_path / "killed", ppl_sources=(), resume=True)
    a = load_file(str(tmp_path / "full" / "importance.safetensors"))
    b = load_file(str(tmp_path / "killed" / "importance.safetensors"))
    assert sorted(a) == sorted(b) == ["layer.0", "layer.1"]  # layer 0 came from before the kill
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_timings_cover_the_time_before_the_job(tiny_model_dir, tmp_path):
    """results.json times what no stage covers: ``before_job`` (the process's age when the job was
    called: interpreter, imports, argument parsing), ``preflight`` and ``tokenize``. Oracle: a CLI
    child that sleeps 1 s before importing rsq records ``before_job`` of at least that second and at
    most the child's wall time measured from outside."""
    import subprocess
    import sys
    import time

    out = tmp_path / "o"
    code = (
        "import time, sys; time.sleep(1.0); from rsq.cli.main import main; "
        f"sys.exit(main(['quantize', {str(tiny_model_dir('llama'))!r}, '--method', 'gptq', '--bits', '4', "
        f"'--nsamples', '4', '--seqlen', '64', '--ppl', 'none', '--device', 'cpu', '-q', '--out', {str(out)!r}]))"
    )
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-2000:]
    t = json.loads((out / "results.json").read_text())["timings"]
    assert 1.0 <= t["before_job"] <= wall
    assert t["preflight"] >= 0 and t["tokenize"] >= 0
    assert t["before_job"] + t["preflight"] + t["total"] <= wall
    assert t["sessions"][0]["timings"]["before_job"] == t["before_job"]
