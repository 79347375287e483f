"""Random combinations of `rsq quantize` options on a tiny model: each run either succeeds (a
complete output directory) or exits 2 with one line on stderr; never a traceback, never an output
or partial directory without resumable state."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsq.cli.main import main

OPTIONS = {
    "--method": st.sampled_from(["fp16", "rtn", "gptq", "quarot", "rsq"]),
    "--bits": st.sampled_from(["-1", "1", "2", "3", "4", "5", "7", "8", "9"]),
    "--group-size": st.sampled_from(["-2", "-1", "0", "8", "9", "32", "48"]),
    "--grid": st.sampled_from(["uniform", "nf", "e8p", "int4"]),
    "--nsamples": st.sampled_from(["-1", "0", "1", "2"]),
    "--seqlen": st.sampled_from(["0", "1", "2", "16", "600"]),
    "--ppl-seqlen": st.sampled_from(["0", "1", "16", "513"]),
    "--max-windows": st.sampled_from(["-1", "0", "1", "2"]),
    "--ppl-batch-size": st.sampled_from(["0", "1", "3"]),
    "--batch-size": st.sampled_from(["-1", "0", "1", "3"]),
    "--device": st.sampled_from(["auto", "cpu", "tpu", "cuda:7"]),
    "--expand": st.sampled_from(["0", "1", "2"]),
    "--importance": st.sampled_from(["attncon", "actnorm", "nonsense"]),
    "--r-min": st.sampled_from(["-0.5", "0.01", "2"]),
    "--damp": st.sampled_from(["-1", "0.01", "1.5"]),
    "--dtype": st.sampled_from(["float32", "bfloat16", "int8"]),
    "--calib": st.sampled_from(["wikitext2", "BINARY", "MISSING", "SHORT"]),
    "--ppl": st.sampled_from(["none", "wikitext2", "BINARY"]),
    "--pad-mlp": st.sampled_from(["0", "64", "128", "auto", "wide"]),  # the tiny Llama's MLP is 96 wide
}
FLAGS = ["--asym", "--no-clip", "--act-order", "--no-rotate", "--resume", "--overwrite", "--force-seqlen"]


def _lines(err: str) -> list[str]:
    """stderr lines as a terminal shows them: without tqdm's redraws, and without the progress lines
    that replace the bars where stderr is not a terminal (as under capsys)."""
    from tests.integration.test_bad_inputs import PROGRESS_LINE

    return [seg for line in err.splitlines() if (seg := line.split("\r")[-1].strip()) and not PROGRESS_LINE.match(seg)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-files")
    (d / "blob.bin").write_bytes(bytes(range(256)) * 8)
    (d / "short.txt").write_text("only a few words")
    return {"BINARY": str(d / "blob.bin"), "MISSING": str(d / "missing.txt"), "SHORT": str(d / "short.txt")}


@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    chosen=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.just(None), max_size=7).flatmap(
        lambda d: st.fixed_dictionaries({k: OPTIONS[k] for k in d})
    ),
    flags=st.lists(st.sampled_from(FLAGS), unique=True, max_size=3),
    out_kind=st.sampled_from(["fresh", "below-file", "existing"]),
)
def test_random_options_succeed_or_fail_in_one_line(tiny_model_dir, tmp_path_factory, files, capsys, chosen, flags,
                                                     out_kind):  # fmt: skip
    model = str(tiny_model_dir("llama"))
    root = tmp_path_factory.mktemp("fuzz")
    (root / "afile").write_text("x")
    out = {"fresh": root / "run", "below-file": root / "afile" / "run", "existing": root / "afile"}[out_kind]
    # small by default so the runs that succeed take a second; the drawn options override these
    opts = {"--nsamples": "2", "--seqlen": "16", "--ppl-seqlen": "16", "--max-windows": "2", **chosen}
    argv = ["quantize", model, "--out", str(out), *flags]
    for flag, value in opts.items():
        argv += [flag, files.get(value, value)]
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    err = _lines(captured.err)
    assert "Traceback" not in captured.err, (argv, captured.err)
    if rc == 0:
        assert json.loads((root / "run" / "results.json").read_text())["config"]["calib"]["nsamples"] >= 1
    else:
        assert rc == 2, (argv, err)
        assert len(err) == 1 and err[0].startswith("rsq: error:"), (argv, err)
        assert not (root / "run").exists(), argv
    partial = root / "run.partial"
    assert not partial.exists() or (partial / "state.json").is_file(), argv
    assert (root / "afile").read_text() == "x", argv
