"""Issue 22: every bad input fails before the work with one line on stderr and exit 2, creating
nothing; interrupts and resumes keep finished work; results are finite and valid JSON."""

import json
import math
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rsq.cli.main import main
from rsq.config import CalibConfig, GridConfig, RSQConfig, SolverConfig
from rsq.job.run import STATE_FILE, _Interrupted, partial_dir, run_quantize

FAST = ("--nsamples", "2", "--seqlen", "32", "--ppl-seqlen", "32", "--max-windows", "2")


PROGRESS_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ")


def _lines(err: str) -> list[str]:
    """stderr lines as a terminal shows them (tqdm redraws with carriage returns; the progress lines
    that replace the bars where stderr is not a terminal, as under capsys, are not shown there)."""
    return [seg for line in err.splitlines() if (seg := line.split("\r")[-1].strip()) and not PROGRESS_LINE.match(seg)]


def _one_error(capsys, rc: int, *needles: str) -> str:
    err = _lines(capsys.readouterr().err)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("rsq: error:"), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def _nothing_created(tmp_path: Path, name: str = "o") -> None:
    assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.partial").exists()


@pytest.fixture
def llama(tiny_model_dir, capsys):
    d = str(tiny_model_dir("llama"))
    capsys.readouterr()  # the fixture's own save output
    return d


def _cfg(model_dir, method="gptq", **kw):
    return RSQConfig(
        model=str(model_dir),
        method=method,
        grid=GridConfig(bits=3),
        solver=SolverConfig(algorithm="gptq"),
        calib=CalibConfig(nsamples=4, seqlen=64),
        batch_size=3,
        **kw,
    )


# -- row 1: --bits 5/6/7; rsq eval on a checkpoint saying bits 5


@pytest.mark.parametrize("bits", ["5", "6", "7"])
def test_unstorable_bits_fail_at_parse_time(llama, tmp_path, capsys, monkeypatch, bits):
    import rsq.job.weights

    def no_model(*a, **k):  # the check must come before any weight is read
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(rsq.job.weights, "load_model", no_model)
    rc = main(["quantize", llama, "--bits", bits, "--out", str(tmp_path / "o"), *FAST])
    _one_error(capsys, rc, f"--bits {bits}", "--bits 4", "--bits 8")
    _nothing_created(tmp_path)


def test_nf_and_e8p_bits(capsys, tmp_path, llama):
    rc = main(["quantize", llama, "--grid", "nf", "--bits", "6", "--out", str(tmp_path / "o"), *FAST])
    _one_error(capsys, rc, "nf grid")
    rc = main(["quantize", llama, "--grid", "e8p", "--bits", "3", "--out", str(tmp_path / "o"), *FAST])
    _one_error(capsys, rc, "--bits 2")


def test_eval_of_checkpoint_with_unstorable_bits(llama, tmp_path, capsys):
    out = tmp_path / "ckpt"
    run_quantize(_cfg(llama), out, ppl_sources=())
    cfg_file = out / "config.json"
    config = json.loads(cfg_file.read_text())
    config["quantization_config"]["bits"] = 5
    cfg_file.write_text(json.dumps(config))
    rc = main(["eval", str(out), "--seqlen", "32", "--max-windows", "2"])
    _one_error(capsys, rc, str(cfg_file), "5")


# -- row 2: --calib a binary file (and an unreadable --ppl file)


def test_binary_calibration_file(llama, tmp_path, capsys):
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"plain start " + bytes([0xFF, 0xFE, 0x00, 0x81]) * 64)
    rc = main(["quantize", llama, "--calib", str(blob), "--out", str(tmp_path / "o"), *FAST])
    _one_error(capsys, rc, str(blob), "offset 12", "UTF-8")
    _nothing_created(tmp_path)
    rc = main(["quantize", llama, "--ppl", str(blob), "--out", str(tmp_path / "o"), *FAST])
    _one_error(capsys, rc, str(blob), "offset 12")
    _nothing_created(tmp_path)
    rc = main(["eval", llama, "--ppl", str(blob), "--seqlen", "32"])
    _one_error(capsys, rc, str(blob))


# -- rows 3, 4: --max-windows -1, --ppl-seqlen 0, rsq eval --seqlen 0 / 1, --ppl-batch-size 0


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--max-windows", "-1"), "--max-windows -1"),
        (("--ppl-seqlen", "0"), "--ppl-seqlen 0"),
        (("--ppl-seqlen", "1"), "--ppl-seqlen 1"),
        (("--ppl-batch-size", "0"), "--ppl-batch-size 0"),
        (("--nproc", "0"), "--nproc 0"),
    ],
)
def test_bad_counts_quantize(llama, tmp_path, capsys, args, needle):
    rc = main(["quantize", llama, "--out", str(tmp_path / "o"), *FAST, *args])
    _one_error(capsys, rc, needle)
    _nothing_created(tmp_path)


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--max-windows", "-1"), "--max-windows -1"),
        (("--seqlen", "0"), "--seqlen 0"),
        (("--seqlen", "1"), "--seqlen 1"),
        (("--ppl-batch-size", "-3"), "--ppl-batch-size -3"),
    ],
)
def test_bad_counts_eval(llama, capsys, args, needle):
    rc = main(["eval", llama, *args])
    _one_error(capsys, rc, needle)


# -- row 5: --out below a regular file, under /proc or /sys


def test_unwritable_outputs(llama, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, needle in (
        (afile / "run", "which is a file"),
        (afile / "deeper" / "run", "which is a file"),
        (afile, "existing file"),
        (Path("/proc/rsq-test/run"), "cannot create"),
        (Path("/sys/rsq-test"), "cannot create"),
    ):
        rc = main(["quantize", llama, "--out", str(out), *FAST, "--overwrite"])
        _one_error(capsys, rc, str(out))
    assert afile.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    rc = main(["eval", llama, "--seqlen", "32", "--max-windows", "1", "--json-out", str(afile / "r.json")])
    _one_error(capsys, rc, "--json-out", "which is a file")


# -- row 6: --seqlen beyond the model's context (100000 was killed for memory)


def test_seqlen_beyond_context(llama, tmp_path, capsys):
    rc = main(["quantize", llama, "--out", str(tmp_path / "o"), *FAST, "--seqlen", "100000"])
    _one_error(capsys, rc, "--seqlen 100000", "512 tokens", "--force-seqlen")
    rc = main(["quantize", llama, "--out", str(tmp_path / "o"), *FAST, "--ppl-seqlen", "513"])
    _one_error(capsys, rc, "--ppl-seqlen 513", "--force-seqlen")
    _nothing_created(tmp_path)
    rc = main(["eval", llama, "--seqlen", "4096"])
    _one_error(capsys, rc, "--seqlen 4096")


# -- row 7 (+ row 10): NaN evaluation is an error; results JSON has no bare NaN


@pytest.fixture
def nan_head_model(tiny_model_dir, tmp_path_factory):
    """Mistral (untied head) with a NaN output head: calibration is finite, evaluation NaN."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tiny_model_dir("mistral")
    model = AutoModelForCausalLM.from_pretrained(src)
    model.lm_head.weight.data[:] = float("nan")
    bad = tmp_path_factory.mktemp("nan-head")
    model.save_pretrained(bad)
    AutoTokenizer.from_pretrained(src).save_pretrained(bad)
    return str(bad)


def test_nan_perplexity_is_an_error(nan_head_model, tmp_path, capsys):
    capsys.readouterr()
    rc = main(["quantize", nan_head_model, "--method", "fp16", "--out", str(tmp_path / "o"), *FAST])
    _one_error(capsys, rc, "perplexity on wikitext2 is nan", "evaluation stage", "model itself")
    _nothing_created(tmp_path)
    rc = main(["quantize", nan_head_model, "--method", "gptq", "--out", str(tmp_path / "q"), *FAST])
    _one_error(capsys, rc, "is nan", "gptq model", "rsq eval")
    assert not (tmp_path / "q").exists()  # the finished layers stay resumable in q.partial
    assert (partial_dir(tmp_path / "q") / STATE_FILE).is_file()
    rc = main(["eval", nan_head_model, "--seqlen", "32", "--max-windows", "2", "--json-out", str(tmp_path / "e.json")])
    _one_error(capsys, rc, "is nan", "evaluation stage")
    assert not (tmp_path / "e.json").exists()


def test_non_finite_values_are_written_as_null(tmp_path):
    from rsq import jsonsafe

    data = {"perplexity": {"wikitext2": float("nan"), "c4": 12.5}, "losses": [1.0, float("inf")], "average": -math.inf}
    text = jsonsafe.dumps(data, indent=2)
    parsed = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert parsed["perplexity"] == {"wikitext2": None, "c4": 12.5}
    assert parsed["losses"] == [1.0, None] and parsed["average"] is None
    assert parsed["non_finite"]["perplexity.wikitext2"] == "nan"
    assert parsed["non_finite"]["losses[1]"] == "inf" and parsed["non_finite"]["average"] == "-inf"
    assert "note" in parsed["non_finite"]


def test_lm_eval_json_with_nan_average_is_valid(tmp_path):
    from rsq.cli.cmd_eval import _write_json

    _write_json(str(tmp_path / "lm.json"), {"tasks": {}, "average": float("nan")})
    parsed = json.loads((tmp_path / "lm.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert parsed["average"] is None and parsed["non_finite"]["average"] == "nan"


# -- row 9: --device tpu


def test_unknown_device(llama, tmp_path, capsys):
    for cmd in (["quantize", llama, "--out", str(tmp_path / "o"), *FAST], ["eval", llama]):
        rc = main([*cmd, "--device", "tpu"])
        _one_error(capsys, rc, "--device 'tpu'", "cuda:N")
    _nothing_created(tmp_path)


# -- row 11: rerunning a killed run's command without --resume


def _argv(model, out, *extra):
    return ["quantize", model, "--method", "gptq", "--bits", "3", "--nsamples", "4", "--seqlen", "64",
            "--batch-size", "3", "--out", str(out), "--ppl", "none", *extra]  # fmt: skip


def test_unfinished_run_is_not_discarded(llama, tmp_path, capsys):
    out = tmp_path / "o"
    with pytest.raises(_Interrupted):
        run_quantize(_cfg(llama), out, ppl_sources=(), stop_after_layer=0)
    part = partial_dir(out)
    before = {p.name: p.read_bytes() for p in part.iterdir()}
    capsys.readouterr()
    rc = main(_argv(llama, out))
    _one_error(capsys, rc, str(part), "1 finished layers", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in part.iterdir()} == before  # untouched
    rc = main(_argv(llama, out, "--bits", "4", "--resume"))  # other options: refused before any work
    _one_error(capsys, rc, "different options", "--overwrite")
    assert {p.name: p.read_bytes() for p in part.iterdir()} == before
    assert main(_argv(llama, out, "--overwrite")) == 0  # explicitly discarded: starts over
    saved = json.loads((out / "results.json").read_text())
    assert saved["resumed_after_layers"] == 0 and not part.exists()


# -- row 12: --group-size advice satisfies every width


def test_group_size_advice_divides_every_width(llama, tmp_path, capsys):
    import re

    from transformers import AutoModelForCausalLM

    rc = main(["quantize", llama, "--group-size", "12", "--out", str(tmp_path / "o"), *FAST])
    line = _one_error(capsys, rc, "64", "96")  # names both failing widths (q..up: 64, down: 96)
    fix = int(re.search(r"use --group-size (\d+)", line).group(1))
    model = AutoModelForCausalLM.from_pretrained(llama)
    widths = {m.in_features for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    assert widths == {64, 96} and all(w % fix == 0 for w in widths)
    assert main(["quantize", llama, "--group-size", str(fix), "--out", str(tmp_path / "o"), *FAST]) == 0


def test_group_size_advice_on_the_default_models_widths():
    """SmolLM2-135M's widths (576 and 1536, from its embedded config) with --group-size 9."""
    from rsq.errors import ConfigError
    from rsq.io.loading import load_config
    from rsq.models.registry import resolve
    from rsq.plan.preflight import check_group_size

    config = load_config(None)
    widths = {name: shape[1] for name, shape in resolve(config).linear_shapes(config).items()}
    assert set(widths.values()) == {576, 1536}
    import re

    # 9 divides 576 but not 1536; 512 (a divisor of 1536, as the old advice suggested) not 576
    for size, failing in ((9, "1536 (down_proj)"), (512, "576 (q_proj"), (100, "576 (q_proj")):
        with pytest.raises(ConfigError) as info:
            check_group_size(size, widths)
        text = str(info.value)
        assert failing in text and "576, 1536" in text, text  # every width of the model is named
        fix = int(re.search(r"use --group-size (\d+)", text).group(1))
        assert all(w % fix == 0 for w in widths.values())
        check_group_size(fix, widths)  # following the advice passes
    with pytest.raises(ConfigError, match="1536 \\(down_proj\\)"):
        check_group_size(100, widths)  # fails both widths: both are listed


# -- row 13: --resume of a run whose layers were all finished


@pytest.mark.parametrize("stream", [None, False])  # streamed (the default for a directory), in memory
def test_resume_of_finished_layers_skips_propagation(llama, tmp_path, stream):
    cfg = _cfg(llama)
    ppl = dict(ppl_sources=("wikitext2",), ppl_seqlen=64, ppl_max_windows=2, stream=stream)
    full = run_quantize(cfg, tmp_path / "full", **ppl)
    out = tmp_path / "killed"
    with pytest.raises(_Interrupted):
        run_quantize(cfg, out, ppl_sources=(), stop_after_layer=1, stream=stream)  # the last layer: all finished
    state = json.loads((partial_dir(out) / STATE_FILE).read_text())
    assert state["finished_layers"] == 2
    res = run_quantize(cfg, out, resume=True, **ppl)
    assert res["resumed_after_layers"] == 2
    # no calibration capture or propagation ran again: those stage times are exactly the first
    # session's (a streamed run fetches, rotates and runs the layers once more, for the evaluation
    # windows only: the stages that may grow)
    again = {"io_wait_read", "layer_copy", "rotate", "eval_capture", "eval_propagate"}
    first = {k: v for k, v in state["timings"].items() if k not in again}
    assert {k: v for k, v in res["timings"]["stages"].items() if k not in again} == first
    assert {"capture", "propagate", "hessian", "solve"} <= set(first)
    sessions = res["timings"]["sessions"]
    assert [s["layers_quantized"] for s in sessions] == [[0, 1], []]
    assert sessions[0]["timings"]["quantize"] > 0
    for key in ("load", "quantize", "total"):
        assert res["timings"][key] == pytest.approx(sum(s["timings"].get(key, 0.0) for s in sessions))
    assert res["timings"]["quantize"] >= sessions[0]["timings"]["quantize"]
    assert res["perplexity"]["wikitext2"] == full["perplexity"]["wikitext2"]
    a = load_file(str(next((tmp_path / "full").glob("*.safetensors"))))
    b = load_file(str(next(out.glob("*.safetensors"))))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- item 5: SIGINT / SIGTERM


def _signal_after(monkeypatch, sig, after_layer: int | None):
    """Make the run deliver ``sig`` to this process before the first layer (None) or after one."""
    import rsq.job.run
    from rsq.job.store import RunStore

    real_loop, real_finish = rsq.job.run.run_layers, RunStore.finish

    def loop(*args, **kw):
        if after_layer is None:
            os.kill(os.getpid(), sig)
        return real_loop(*args, **kw)

    def finish(self, i, state):
        real_finish(self, i, state)
        if i == after_layer:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(rsq.job.run, "run_layers", loop)
    monkeypatch.setattr(RunStore, "finish", finish)


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt), which these tests exercise, whatever the suite
    inherited: a process started with SIGINT ignored (a background job, `setsid nohup ... &`) keeps
    SIG_IGN and Python then installs no handler, so the signal would do nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_before_first_layer_leaves_nothing(llama, tmp_path, capsys, monkeypatch, python_sigint, sig, code):
    _signal_after(monkeypatch, sig, None)
    rc = main(_argv(llama, tmp_path / "o"))
    err = _lines(capsys.readouterr().err)
    assert rc == code and len(err) == 1 and err[0].startswith("rsq: interrupted by"), err
    assert "nothing was kept" in err[0]
    _nothing_created(tmp_path)
    assert signal.getsignal(signal.SIGTERM) is not None


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_after_a_layer_is_resumable(llama, tmp_path, capsys, monkeypatch, python_sigint, sig, code):
    out = tmp_path / "o"
    run_quantize(_cfg(llama), tmp_path / "ref", ppl_sources=())
    _signal_after(monkeypatch, sig, 0)
    rc = main(_argv(llama, out))
    err = _lines(capsys.readouterr().err)
    assert rc == code and len(err) == 1 and "1 finished layers kept" in err[0] and "--resume" in err[0], err
    assert not out.exists() and json.loads((partial_dir(out) / STATE_FILE).read_text())["finished_layers"] == 1
    monkeypatch.undo()
    assert main(_argv(llama, out, "--resume")) == 0
    assert json.loads((out / "results.json").read_text())["resumed_after_layers"] == 1
    a = load_file(str(next((tmp_path / "ref").glob("*.safetensors"))))
    b = load_file(str(next(out.glob("*.safetensors"))))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_interrupt_tests_hold_with_sigint_ignored_by_the_parent(tmp_path):
    """The two tests above, run by a pytest whose parent ignores SIGINT (as a suite started in the
    background does): they install the handler they test, so they pass there too (issue 32)."""
    import subprocess
    import sys

    probe = [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN)"]
    assert subprocess.run(probe, preexec_fn=_ignore_sigint, capture_output=True, text=True).stdout.strip() == "True"
    tests = [f"{__file__}::{name}[2-130]" for name in ("test_interrupt_before_first_layer_leaves_nothing",
                                                      "test_interrupt_after_a_layer_is_resumable")]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"), *tests],
        preexec_fn=_ignore_sigint,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


# -- item 2 / row 8: memory predicted and bounded


def test_job_beyond_available_memory_fails_with_options_that_fit(llama, tmp_path, capsys, monkeypatch):
    import re
    from dataclasses import replace

    import rsq.plan.memory
    from rsq.io.loading import load_config
    from rsq.models.registry import resolve
    from rsq.plan.memory import JobShape, host_memory_plan

    cfg = replace(_cfg(llama), batch_size=8, calib=CalibConfig(nsamples=512, seqlen=512))
    from rsq.calib.datasets import load_text

    text = load_text("wikitext2")
    chars = len(text.calib) + len(text.eval)
    config = load_config(llama)
    job = JobShape(ppl_seqlen=32, ppl_batch_size=4, text_chars=chars)
    big = host_memory_plan(config, resolve(config), cfg, job)["quantize"]
    one = replace(cfg, calib=CalibConfig(nsamples=1, seqlen=512))
    small = host_memory_plan(config, resolve(config), one, job)["quantize"]
    avail = rsq.plan.memory._rss_bytes() + (big + small) // 2  # room for some of the 512 windows, not all
    monkeypatch.setattr(rsq.plan.memory, "available_bytes", lambda: avail)
    argv = ["quantize", llama, "--method", "gptq", "--nsamples", "512", "--seqlen", "512", "--batch-size", "8",
            "--ppl-seqlen", "32", "--max-windows", "2", "--out", str(tmp_path / "o")]  # fmt: skip
    line = _one_error(capsys, main(argv), "GiB of host memory", "available", "--nsamples")
    _nothing_created(tmp_path)
    n = int(re.search(r"--nsamples (\d+)", line).group(1))
    assert 1 <= n < 512
    argv[argv.index("512")] = str(n)  # the advice fits: the same command with it runs
    assert main(argv) == 0


def test_results_record_predicted_and_measured_peak(llama, tmp_path):
    res = run_quantize(_cfg(llama), tmp_path / "o", ppl_seqlen=64, ppl_max_windows=2)
    mem = json.loads((tmp_path / "o" / "results.json").read_text())["host_memory"]
    assert mem == json.loads(json.dumps(res["host_memory"]))
    assert mem["predicted_peak_GiB"] > 0 and mem["measured_peak_GiB"] > 0 and mem["ppl_batch_size"] == 4
    assert set(mem["stages_GiB"]) == {"load", "quantize", "perplexity", "save"}


def test_large_vocabulary_evaluation_is_chunked():
    """Qwen2.5-0.5B (152k vocabulary): the evaluation's working memory no longer scales with batch x
    positions x vocabulary (4 x 511 x 151936 float32 logits were 1.2 GB, times the copies)."""
    from rsq.eval.perplexity import LOGITS_BUDGET, positions_per_chunk
    from rsq.models.bundled import load_bundled_config
    from rsq.models.registry import resolve
    from rsq.plan.memory import LOGITS_COPIES, eval_bytes

    config = load_bundled_config("qwen2.5-0.5b")
    assert config.vocab_size > 150_000
    step = positions_per_chunk(4, config.vocab_size)
    assert 4 * step * config.vocab_size * 4 <= LOGITS_BUDGET < 4 * (step + 1) * config.vocab_size * 4
    whole = 4 * 511 * config.vocab_size * 4 * LOGITS_COPIES
    assert eval_bytes(config, resolve(config), 512, 4) < whole / 4


def test_chunked_nll_equals_whole_logits():
    import torch.nn.functional as F

    from rsq.eval.perplexity import window_nll
    from tests.conftest import tiny_model

    for family in ("llama", "qwen2", "mistral"):
        model = tiny_model(family, vocab_size=1000)
        windows = torch.randint(0, 1000, (5, 33), generator=torch.Generator().manual_seed(0))
        got = window_nll(model, windows, torch.device("cpu"), 2, logits_budget=4 * 2 * 1000 * 3)  # 3 positions
        logits = model(input_ids=windows).logits[:, :-1].double()
        ref = F.cross_entropy(logits.reshape(-1, 1000), windows[:, 1:].reshape(-1), reduction="none")
        torch.testing.assert_close(got, ref.view(5, -1).mean(dim=1), rtol=1e-6, atol=1e-6)


def test_eval_batch_follows_the_option(llama, monkeypatch):
    import rsq.eval.runner

    seen = []
    real = rsq.eval.runner.perplexity
    monkeypatch.setattr(rsq.eval.runner, "perplexity", lambda m, w, d, b, **k: seen.append(b) or real(m, w, d, b, **k))
    rsq.eval.runner.run_eval(llama, ("wikitext2",), seqlen=32, max_windows=3, batch_size=2)
    assert seen == [2]


# -- --export-block that does not fit the MLP width (issue 33)


@pytest.mark.parametrize("block,needle", [("40", "--export-block 40"), ("6", "--export-block 6"), ("-4", "-4")])
def test_export_block_that_does_not_fit(llama, tmp_path, capsys, block, needle):
    """The tiny Llama's down_proj input is 96 wide: 40 does not divide it, 6 divides it but no
    Hadamard of order 6 exists; the line names the orders that would work, which then run."""
    rc = main(["quantize", llama, "--method", "quarot", "--export-block", block, "--out", str(tmp_path / "o"), *FAST])
    line = _one_error(capsys, rc, needle)
    _nothing_created(tmp_path)
    if block != "-4":
        assert "96" in line and line.endswith("one of 4, 8, 12, 16, 24, 32, 48, 96")
    if block == "40":
        argv = ["quantize", llama, "--method", "quarot", "--export-block", "48", "--out", str(tmp_path / "o")]
        rc = main([*argv, *FAST])
        assert rc == 0
        qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
        assert qc["rotation"]["online"][0]["head_dim"] == 48
