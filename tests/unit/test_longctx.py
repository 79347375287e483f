"""Long-context retrieval: generated prompts checked by parsing them back, scoring rules, the token
budget fit, accuracy aggregation against oracle "models", greedy decoding against a hand loop, and
the benchmark loaders' fields and errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from rsq.errors import ConfigError
from rsq.eval import longctx as lc

LINE = re.compile(r"^line (\S+): REGISTER_CONTENT is <(\d+)>$", re.MULTILINE)
ASK_LINE = re.compile(r"REGISTER_CONTENT in line (\S+)\?")


def _parse_lines(prompt: str):
    pairs = LINE.findall(prompt)
    asked = ASK_LINE.search(prompt).group(1)
    return [k for k, _ in pairs], [v for _, v in pairs], asked


def _parse_kv(prompt: str):
    obj = prompt[prompt.index("{") : prompt.rindex("}") + 1]
    data = json.loads(obj)  # dicts keep insertion order
    asked = json.loads(re.search(r'Key: ("[^"]+")', prompt).group(1))
    return list(data), list(data.values()), asked


@pytest.mark.parametrize("position,index", [("start", 0), ("middle", 24), ("end", 49), ("0.25", 12), ("1", 49)])
def test_lines_prompt_parses_back_to_its_answer(position, index):
    ex = lc.make_example("lines", 50, position, seed=3, sample=1)
    keys, values, asked = _parse_lines(ex.prompt)
    assert len(keys) == 50 and len(set(keys)) == 50 and len(set(values)) == 50
    assert all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)
    assert all(1 <= int(v) <= 50000 for v in values)
    assert ex.gold_index == index and keys.index(asked) == index
    assert values[index] == ex.answer


@pytest.mark.parametrize("position,index", [("start", 0), ("middle", 9), ("end", 19)])
def test_kv_prompt_parses_back_to_its_answer(position, index):
    ex = lc.make_example("kv", 20, position, seed=0, sample=0)
    keys, values, asked = _parse_kv(ex.prompt)
    assert len(keys) == 20 and keys.index(asked) == index and values[index] == ex.answer
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", k) for k in keys)


def test_examples_are_deterministic_and_seeded():
    a = lc.make_example("lines", 30, "middle", seed=7, sample=2)
    assert a == lc.make_example("lines", 30, "middle", seed=7, sample=2)
    assert a.prompt != lc.make_example("lines", 30, "middle", seed=8, sample=2).prompt
    assert a.prompt != lc.make_example("lines", 30, "middle", seed=7, sample=3).prompt


def test_bad_positions_and_tasks_are_refused():
    for bad in ("left", "1.5", "-0.1"):
        with pytest.raises(ConfigError, match="position"):
            lc.gold_index(bad, 10)
    with pytest.raises(ConfigError, match="unknown long-context task"):
        lc.make_example("needle", 10, "start", 0, 0)


def test_scoring_rules():
    assert lc.score_retrieval("lines", "The REGISTER_CONTENT is <12345>.", "12345")
    assert lc.score_retrieval("lines", "12345", "12345")
    assert not lc.score_retrieval("lines", "line 3 holds 12345", "12345")  # first integer rule
    assert not lc.score_retrieval("lines", "123456", "12345")
    assert not lc.score_retrieval("lines", "I do not know", "12345")
    assert lc.score_retrieval("kv", '"ABC-def"', "abc-DEF")
    assert not lc.score_retrieval("kv", "abc", "abc-def")


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE (every byte in the alphabet, byte-level decoder), trained on a few
    generated prompts: decode(encode(text)) == text, which the oracle models below rely on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [lc.make_example(t, 40, "start", 99, k).prompt for t in lc.TASKS for k in range(3)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>")
    sample = lc.make_example("kv", 5, "end", 1, 1).prompt
    assert t.decode(t(sample).input_ids) == sample
    return t


def test_token_budget_gives_the_largest_fitting_count(tok):
    def n_tokens(task, n):
        return len(lc.encode_prompt(tok, lc.make_example(task, n, "end", 0, 0).prompt, False))

    for task, budget in (("lines", 700), ("lines", 2500), ("kv", 900)):
        n = lc.items_for_budget(task, tok, budget, chat=False)
        assert n_tokens(task, n) <= budget < n_tokens(task, n + 1)
    with pytest.raises(ConfigError, match="cannot hold"):
        lc.items_for_budget("lines", tok, 10, chat=False)


class OracleLM(nn.Module):
    """Reads the decoded prompt and answers from it: ``mode`` 'gold' (the asked item) or 'first'
    (always the first item). Stands in for a model to check run_retrieval's plumbing."""

    def __init__(self, tokenizer, mode: str, context: int = 100_000):
        super().__init__()
        self.tokenizer, self.mode = tokenizer, mode
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = type("Cfg", (), {"max_position_embeddings": context})()

    def generate(self, input_ids, max_new_tokens, **_):
        text = self.tokenizer.decode(input_ids[0])
        if "REGISTER_CONTENT" in text:
            keys, values, asked = _parse_lines(text)
        else:
            keys, values, asked = _parse_kv(text)
        value = values[keys.index(asked)] if self.mode == "gold" else values[0]
        answer = self.tokenizer(f"The value is {value}.").input_ids
        return torch.cat([input_ids, torch.tensor([answer])], dim=1)


@pytest.mark.parametrize("task", ["lines", "kv"])
def test_accuracy_by_position_against_oracle_models(tok, task):
    positions = ["start", "middle", "end"]
    perfect = lc.run_retrieval(
        OracleLM(tok, "gold"), tok, task, items=[4, 12], positions=positions, samples=2, chat=False
    )
    assert perfect["accuracy"] == 1.0 and perfect["n"] == 2 * 3 * 2
    assert [x["items"] for x in perfect["lengths"]] == [4, 12]
    first = lc.run_retrieval(
        OracleLM(tok, "first"), tok, task, items=[4, 12], positions=positions, samples=2, chat=False
    )
    assert first["by_position"] == {"start": 1.0, "middle": 0.0, "end": 0.0}
    assert first["accuracy"] == pytest.approx(1 / 3)
    assert all(x["by_position"]["start"] == 1.0 for x in first["lengths"])


def test_prompts_over_the_context_are_skipped_and_listed(tok):
    n_small = len(lc.encode_prompt(tok, lc.make_example("lines", 3, "end", 0, 0).prompt, False))
    model = OracleLM(tok, "gold", context=n_small + 60)
    res = lc.run_retrieval(
        model, tok, "lines", items=[3, 200], positions=["start", "end"], samples=1, chat=False, max_new_tokens=8
    )
    assert [x["items"] for x in res["lengths"]] == [3] and res["accuracy"] == 1.0
    assert {s["items"] for s in res["skipped"]} == {200} and len(res["skipped"]) == 2


def test_greedy_answer_matches_a_hand_argmax_loop(tok):
    from tests.conftest import tiny_model

    model = tiny_model("llama")
    ids = lc.encode_prompt(tok, lc.make_example("lines", 5, "middle", 0, 0).prompt, False)
    text = lc.greedy_answer(model, tok, ids, max_new_tokens=6)
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(6):  # no cache, full recompute: independent of generate()'s KV cache
            nxt = model(input_ids=seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert text == tok.decode(seq[0, len(ids) :], skip_special_tokens=True)


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_leval_loader_and_exam_metric(tmp_path):
    f = _jsonl(
        tmp_path / "tpo.jsonl",
        [
            {"input": "doc one", "instructions": ["q1", "q2"], "outputs": ["(A)", "ACD"], "source": "tpo"},
            {"input": "doc two", "instructions": ["q3"], "outputs": ["42"]},
        ],
    )
    ex = lc.load_leval(f)
    assert [(e.context, e.question, e.answers) for e in ex] == [
        ("doc one", "q1", ["(A)"]),
        ("doc one", "q2", ["ACD"]),
        ("doc two", "q3", ["42"]),
    ]
    assert lc.score_long("leval_exam", "A. because", ["(A)"]) == 1.0
    assert lc.score_long("leval_exam", "B", ["(A)"]) == 0.0
    assert lc.score_long("leval_exam", "A, C and D", ["ACD"]) == 1.0
    assert lc.score_long("leval_exam", "A and C", ["ACD"]) == 0.0
    assert lc.score_long("leval_exam", "The answer is 42.", ["42"]) == 1.0
    with pytest.raises(ConfigError, match="not found"):
        lc.load_leval(tmp_path / "missing.jsonl")
    bad = _jsonl(tmp_path / "bad.jsonl", [{"input": "x", "instructions": ["q"]}])
    with pytest.raises(ConfigError, match="'outputs'"):
        lc.load_leval(bad)


def test_longiclbench_loader_builds_rounds_of_demonstrations(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}", "label": i % 3} for i in range(6)])
    test = _jsonl(tmp_path / "test.jsonl", [{"text": "what?", "label": 2}])
    ex = lc.load_longiclbench(train, test, rounds=2, label_names=["a", "b", "c"])
    demos = re.findall(r"query: (t\d)\nlabel: (\w)", ex[0].context)
    assert demos == [("t0", "a"), ("t1", "b"), ("t2", "c"), ("t3", "a"), ("t4", "b"), ("t5", "c")]
    assert ex[0].answers == ["c"] and ex[0].question.endswith("label:")
    assert lc.score_long("label", " c\nmore", ["c"]) == 1.0 and lc.score_long("label", "b", ["c"]) == 0.0
    with pytest.raises(ConfigError, match="label_names"):
        lc.load_longiclbench(train, test)


def test_lca_loader_and_api_recall(tmp_path):
    f = _jsonl(
        tmp_path / "lca.jsonl",
        [
            {
                "instruction": "plot it",
                "clean_reference": "import x",
                "unique_apis": ["lib.Figure", "lib.save"],
                "repo_full_name": "o/r",
            }
        ],
    )
    ex = lc.load_lca_library(f)
    assert ex[0].id == "o/r" and ex[0].answers == ["lib.Figure", "lib.save"]
    assert lc.score_long("api_recall", "f = Figure(); f.show()", ex[0].answers) == 0.5
    with pytest.raises(ConfigError, match="clean_reference"):
        lc.load_lca_library(_jsonl(tmp_path / "b.jsonl", [{"instruction": "x", "unique_apis": []}]))


def test_cli_longctx_json_feeds_the_report(tiny_model_dir, tmp_path, capsys):
    """rsq longctx on a tiny random model (context 512): the 3-item prompts run, the 60-item ones are
    skipped as too long, and the JSON is read by rsq report's loader."""
    import argparse

    from rsq.cli.cmd_eval import add_parsers
    from rsq.report.compare import load_run

    parser = argparse.ArgumentParser(prog="rsq")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    run = tmp_path / "run"
    leval = _jsonl(
        tmp_path / "tpo.jsonl", [{"input": "short doc", "instructions": ["q1", "q2"], "outputs": ["A", "B"]}]
    )
    args = parser.parse_args(
        [
            "longctx",
            str(tiny_model_dir("llama")),
            "--task",
            "lines,kv",
            "--lines",
            "3,60",
            "--positions",
            "start,end",
            "--samples",
            "1",
            "--device",
            "cpu",
            "--max-new-tokens",
            "4",
            "--leval",
            str(leval),
            "--bench-new-tokens",
            "3",
            "--json-out",
            str(run / "longctx.json"),
        ]
    )
    assert args.func(args) == 0
    data = json.loads((run / "longctx.json").read_text())
    assert data["benchmarks"]["leval:tpo"]["n"] == 2 and data["benchmarks"]["leval:tpo"]["metric"] == "leval_exam"
    for task in ("lines", "kv"):
        r = data["tasks"][task]
        assert [x["items"] for x in r["lengths"]] == [3] and r["n"] == 2
        assert {s["items"] for s in r["skipped"]} == {60}
    assert "skipped" in capsys.readouterr().out
    loaded = load_run(run)
    assert set(loaded.retrieval) == {"lines", "kv"} and "leval:tpo" in loaded.bench
    missing = parser.parse_args(["longctx", "--task", "none", "--leval", str(tmp_path / "absent.jsonl")])
    with pytest.raises(ConfigError, match="L-Eval data not found"):
        missing.func(missing)  # raised before any model is loaded
