"""Text sources: the c4 shards read from a local copy (tiny gzipped JSON-lines files written here),
the papers' joining rule, lazy reading, and the one-line error that names the missing file."""

from __future__ import annotations

import gzip
import json

import pytest

from rsq.calib import datasets as ds
from rsq.errors import ConfigError


def _docs(prefix: str, n: int) -> list[str]:
    return [f"{prefix} document {i}: some words, and a second sentence." for i in range(n)]


def _write_shard(path, texts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            row = {"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://x/{i}"}
            f.write(json.dumps(row) + "\n")


@pytest.fixture
def only_here(monkeypatch):
    """Look for data only in the directory passed to the loader, never on the hub."""
    monkeypatch.delenv("RSQ_DATA_DIR", raising=False)
    monkeypatch.setattr(ds, "_candidate_dirs", lambda data_dir: [ds.Path(data_dir)] if data_dir else [])
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)


def test_c4_local_shards_follow_the_papers_protocol(tmp_path, only_here):
    val, train = _docs("val", ds.C4_EVAL_DOCS + 7), _docs("train", 12)
    _write_shard(tmp_path / ds.C4_VALIDATION, val)
    _write_shard(tmp_path / ds.C4_TRAIN, train)
    split = ds.load_text("c4", str(tmp_path))
    # GPTQ/QuaRot/RSQ: ' '.join(valdata[:1100]['text'])
    assert split.eval == " ".join(val[: ds.C4_EVAL_DOCS])
    assert split.calib == "\n\n".join(train)
    assert split.description["validation"] == str(tmp_path / ds.C4_VALIDATION)
    assert split.description["train"] == str(tmp_path / ds.C4_TRAIN)
    assert split.description["eval_documents"] == ds.C4_EVAL_DOCS


def test_c4_subdirectory_and_validation_only_calibration_is_disjoint(tmp_path, only_here):
    n = ds.C4_EVAL_DOCS + 30
    val = _docs("val", n)
    _write_shard(tmp_path / "c4" / "en" / ds.C4_VALIDATION, val)
    split = ds.load_text("c4", str(tmp_path))
    assert split.calib == "\n\n".join(val[ds.C4_EVAL_DOCS :])
    assert split.eval == " ".join(val[: ds.C4_EVAL_DOCS])
    assert "validation documents 1100..1129" in split.description["calib"]


def test_c4_shards_are_read_only_when_used(tmp_path, only_here):
    _write_shard(tmp_path / ds.C4_TRAIN, _docs("train", 3))
    split = ds.load_text("c4", str(tmp_path))  # no validation shard: fine until .eval is read
    assert split.calib.startswith("train document 0")
    with pytest.raises(ConfigError, match=ds.C4_VALIDATION):
        split.eval


def test_missing_c4_names_the_file_and_the_directory(tmp_path, only_here):
    split = ds.load_text("c4", str(tmp_path))
    with pytest.raises(ConfigError) as err:
        split.eval
    msg = str(err.value)
    assert "\n" not in msg
    assert f"put {ds.C4_VALIDATION}" in msg and f"into {tmp_path}" in msg
    assert "the hub is off (HF_HUB_OFFLINE)" in msg  # the fixture turns offline mode on: the reason is named
    with pytest.raises(ConfigError, match=f"c4 train data not found: put {ds.C4_TRAIN}"):
        split.calib


def test_missing_c4_without_data_dir_points_at_the_option(tmp_path, only_here):
    with pytest.raises(ConfigError, match=r"into a directory passed as --data-dir \(or \$RSQ"):
        ds.load_text("c4").eval


def test_malformed_c4_shards_are_config_errors(tmp_path, only_here):
    (tmp_path / ds.C4_VALIDATION).write_text("not gzip")
    with pytest.raises(ConfigError, match="not a gzipped JSON-lines c4 shard"):
        ds.load_text("c4", str(tmp_path)).eval
    with gzip.open(tmp_path / ds.C4_VALIDATION, "wt") as f:
        f.write(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ConfigError, match="line 1 has no string field 'text'"):
        ds.load_text("c4", str(tmp_path)).eval


def test_unknown_source_lists_the_names(tmp_path):
    with pytest.raises(ConfigError, match="not one of wikitext2, c4"):
        ds.load_text(str(tmp_path / "nope.txt"))


@pytest.fixture(scope="module")
def wiki_test_text() -> str:
    _, test = ds.find_wikitext_files()
    assert test is not None, "needs ../shared/data/wikitext-2-raw/wiki.test.raw (or RSQ_DATA_DIR)"
    return test.read_text(encoding="utf-8")[:60_000]


def test_cli_eval_ppl_wikitext2_and_c4(tiny_model_dir, wiki_test_text, tmp_path, only_here, capsys):
    """`rsq eval MODEL --ppl wikitext2,c4`: both measured; c4 missing -> exit 2, one line."""
    from rsq.cli.main import main

    data = tmp_path / "data"
    (data / "wikitext-2-raw").mkdir(parents=True)
    (data / "wikitext-2-raw" / "wiki.test.raw").write_text(wiki_test_text)
    _write_shard(data / ds.C4_VALIDATION, [" ".join(_docs("val", 40))] * 30)
    out = tmp_path / "eval.json"
    model = str(tiny_model_dir("llama"))
    assert (
        main(
            [
                "eval",
                model,
                "--ppl",
                "wikitext2,c4",
                "--seqlen",
                "64",
                "--max-windows",
                "4",
                "--device",
                "cpu",
                "--data-dir",
                str(data),
                "--json-out",
                str(out),
            ]
        )
        == 0
    )
    ppl = json.loads(out.read_text())["perplexity"]
    assert set(ppl) == {"seqlen", "max_windows", "wikitext2", "c4"} and ppl["c4"] > 1

    empty = tmp_path / "empty"
    empty.mkdir()
    capsys.readouterr()
    assert main(["eval", model, "--ppl", "c4", "--device", "cpu", "--data-dir", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"rsq: error: c4 validation data not found: put {ds.C4_VALIDATION}")
