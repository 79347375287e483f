"""lm-eval integration, offline, on the local `rsq_facts` task (24 four-way questions).

Identity oracle: lm-eval loading the same directory itself (``model="hf"``) must give the same
per-choice log-likelihoods and scores as our wrapper around the model rsq loaded. A quantized model
must change them. The metric choice and averaging rule are checked on hand-written lm-eval output.
"""

from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch

from rsq.errors import ConfigError
from rsq.eval.zeroshot import LOCAL_TASKS, _task_manager, run_lm_eval, sample_records, summarize
from rsq.io.hf import load_any

TASK = "rsq_facts"
# Same weights, same fp32 CPU kernels and the same batch composition on both sides: agreement is
# expected to be exact; 1e-5 only absorbs a possible thread-dependent BLAS reduction order.
LL_TOL = 1e-5
LIMIT = 8  # documents per task where only "it runs and changes" is checked (lm-eval takes the first 8)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No hub access in these tests (env for subprocess-style readers, constants for imported ones)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def ours(model_dir):
    model, tok = load_any(str(model_dir))
    return run_lm_eval(model, tok, [TASK], batch_size=4, device="cpu", log_samples=True)


def _lls(records):
    return torch.tensor([ll for r in records for ll in r["loglikelihoods"]], dtype=torch.float64)


def test_wrapper_matches_lm_eval_loading_the_model_itself(model_dir, ours):
    import lm_eval

    raw = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": "float32"},
        device="cpu",
        tasks=[TASK],
        task_manager=_task_manager([TASK], [LOCAL_TASKS]),
        batch_size=4,
        log_samples=True,
    )
    ref = summarize(raw)
    ref_samples = sample_records(raw)[TASK]
    assert len(ref_samples) == len(ours["samples"][TASK]) == 24
    assert [r["doc_id"] for r in ref_samples] == [r["doc_id"] for r in ours["samples"][TASK]]
    assert torch.allclose(_lls(ours["samples"][TASK]), _lls(ref_samples), rtol=0, atol=LL_TOL)
    for key in ("acc,none", "acc_norm,none"):
        assert ours["tasks"][TASK]["metrics"][key] == ref["tasks"][TASK]["metrics"][key]
    assert ours["tasks"][TASK]["metric"] == "acc_norm,none"
    assert ours["average"] == ours["tasks"][TASK]["value"] and ours["averaged"] == [TASK]


def _rtn_fake_quant(model, bits: int):
    """Round-to-nearest every decoder linear in place (per output channel), with rsq's grid."""
    from rsq.config import GridConfig
    from rsq.quant.grid import rtn_quantize

    grid = GridConfig(bits=bits, group_size=-1)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}":
            mod.weight.data = rtn_quantize(mod.weight.data.float(), grid)[3].to(mod.weight.dtype)
    return model


def _first(records, n=LIMIT):
    return [r for r in records if r["doc_id"] < n]


def test_quantized_model_scores_differently(model_dir, ours):
    model, tok = load_any(str(model_dir))
    q = run_lm_eval(_rtn_fake_quant(model, 2), tok, [TASK], batch_size=4, limit=LIMIT, device="cpu", log_samples=True)
    diff = (_lls(q["samples"][TASK]) - _lls(_first(ours["samples"][TASK]))).abs().max().item()
    assert diff > 1e-3, "2-bit RTN should move the log-likelihoods"
    assert 0.0 <= q["tasks"][TASK]["value"] <= 1.0


def test_quantized_checkpoint_runs_through_the_wrapper(model_dir, ours, tmp_path):
    pytest.importorskip("rsq.quant.pack", reason="checkpoint packing not available in this checkout")
    from rsq.config import CalibConfig, GridConfig, RSQConfig, SolverConfig
    from rsq.job.run import run_quantize

    cfg = RSQConfig(
        model=str(model_dir),
        method="gptq",
        grid=GridConfig(bits=3),
        solver=SolverConfig(algorithm="gptq"),
        calib=CalibConfig(nsamples=4, seqlen=64),
        batch_size=4,
    )
    run_quantize(cfg, tmp_path / "q", ppl_sources=())
    model, tok = load_any(str(tmp_path / "q"))
    q = run_lm_eval(model, tok, [TASK], batch_size=4, limit=LIMIT, device="cpu", log_samples=True)
    assert (_lls(q["samples"][TASK]) - _lls(_first(ours["samples"][TASK]))).abs().max().item() > 1e-4
    assert 0.0 <= q["tasks"][TASK]["value"] <= 1.0


def test_metric_choice_and_average_rule():
    raw = {
        "results": {
            "piqa": {"acc,none": 0.6, "acc_norm,none": 0.7, "acc_norm_stderr,none": 0.01},
            "winogrande": {"acc,none": 0.55},
            "lambada_openai": {"acc,none": 0.4, "perplexity,none": 20.0},
            "lambada_standard": {"acc,none": 0.3, "perplexity,none": 30.0},
            "gsm8k": {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2},
            "wikitext": {"word_perplexity,none": 30.0},
            "mmlu": {"acc,none": 0.45},
            "mmlu_stem": {"acc,none": 0.40},
            "mmlu_humanities": {"acc,none": 0.50},
        },
        "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_humanities"], "piqa": []},
    }
    s = summarize(raw)
    assert s["tasks"]["piqa"]["metric"] == "acc_norm,none" and s["tasks"]["piqa"]["stderr"] == 0.01
    assert s["tasks"]["winogrande"]["metric"] == "acc,none"
    assert s["tasks"]["gsm8k"]["metric"] == "exact_match,flexible-extract"
    assert s["tasks"]["wikitext"]["value"] is None
    # lambada (a tag) counts as its two members, mmlu (a group) once, its subtasks not at all
    assert s["averaged"] == ["piqa", "winogrande", "lambada_openai", "lambada_standard", "gsm8k", "mmlu"]
    assert math.isclose(s["average"], (0.7 + 0.55 + 0.4 + 0.3 + 0.2 + 0.45) / 6)
    assert math.isnan(summarize({"results": {"wikitext": {"word_perplexity,none": 3.0}}})["average"])


def _cli(argv):
    from rsq.cli.cmd_eval import add_parsers

    parser = argparse.ArgumentParser(prog="rsq")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_lm_eval_writes_json_with_limit(model_dir, tmp_path, capsys):
    out = tmp_path / "run" / "lm_eval.json"
    assert (
        _cli(
            [
                "lm-eval",
                str(model_dir),
                "--tasks",
                TASK,
                "--limit",
                "8",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--json-out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["kind"] == "lm_eval" and data["limit"] == 8
    assert data["n_samples"][TASK]["effective"] == 8
    assert "average of * entries (1)" in capsys.readouterr().out


def test_cli_eval_with_tasks_runs_lm_eval(model_dir, tmp_path, capsys):
    """`rsq eval MODEL --tasks ...` is `rsq lm-eval` (no perplexity unless --ppl is given)."""
    from rsq.cli.main import main

    out = tmp_path / "run" / "lm_eval.json"
    assert (
        main(
            [
                "eval",
                str(model_dir),
                "--tasks",
                TASK,
                "--limit",
                "8",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--json-out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["kind"] == "lm_eval" and data["n_samples"][TASK]["effective"] == 8 and "perplexity" not in data
    printed = capsys.readouterr().out
    assert "average of * entries (1)" in printed and "wikitext2" not in printed
    assert main(["eval", str(model_dir), "--tasks", TASK, "--ppl", "wikitext2", "--json-out", str(out)]) == 2
    assert "run rsq eval once per kind" in capsys.readouterr().err


def test_bad_inputs_are_config_errors(model_dir, tmp_path):
    model, tok = load_any(str(model_dir))
    with pytest.raises(ConfigError, match="no lm-eval tasks"):
        run_lm_eval(model, tok, [], device="cpu")
    with pytest.raises(ConfigError, match="not a directory"):
        run_lm_eval(copy.deepcopy(model), tok, [TASK], include_path=str(tmp_path / "nope"), device="cpu")


def test_cli_eval_tasks_and_ppl_load_the_model_once(model_dir, monkeypatch, capsys):
    import rsq.cli.cmd_eval
    import rsq.eval.runner
    from rsq.cli.main import main

    calls = []
    real = rsq.eval.runner.load_any
    counted = lambda m, **kw: calls.append(m) or real(m, **kw)  # noqa: E731
    monkeypatch.setattr(rsq.eval.runner, "load_any", counted)  # run_eval's loader
    monkeypatch.setattr(rsq.cli.cmd_eval, "load_any", counted)  # the eval commands' loader
    assert (
        main(
            [
                "eval",
                str(model_dir),
                "--tasks",
                TASK,
                "--limit",
                "4",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--ppl",
                "wikitext2",
                "--seqlen",
                "64",
                "--max-windows",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "wikitext2" in printed and TASK in printed
    assert len(calls) == 1
