"""The demo's text is found offline on a fresh clone (issue 32): no shared/data anywhere, no
--data-dir, the hub unreachable -> the WikiText-2 test file shipped in the package; and a source that
needs the hub fails within seconds, in one line naming --data-dir and $RSQ_DATA_DIR."""

import hashlib
import time

import pytest

from rsq.calib import datasets
from rsq.errors import ConfigError

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once


@pytest.fixture
def fresh_clone(tmp_path, monkeypatch):
    """No local copy anywhere (the candidate directories are empty ones) and the hub unreachable."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RSQ_DATA_DIR", raising=False)
    monkeypatch.setattr(datasets, "_candidate_dirs", lambda data_dir: [tmp_path / "shared" / "data"])
    monkeypatch.setenv("HF_ENDPOINT", CLOSED)
    for var in ("HTTPS_PROXY", "https_proxy", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)


def test_packaged_wikitext_is_found_offline(fresh_clone, monkeypatch):
    def no_hub():
        raise AssertionError("the hub was asked for wikitext-2")

    monkeypatch.setattr(datasets, "_load_wikitext_hub", no_hub)
    text = datasets.load_text("wikitext2")
    assert text.description["test"] == str(datasets.PACKAGED_WIKITEXT)
    # the shipped bytes are the distributed file (sha256 from shared/data/README.md)
    raw = datasets.read_text(datasets.PACKAGED_WIKITEXT)
    assert hashlib.sha256(raw.replace("\n", "\r\n").encode()).hexdigest() == datasets.PACKAGED_WIKITEXT_SHA256
    assert (
        "articles 0..30, evaluation = articles 31..61 (of 62)" in text.description["split"]
        and text.calib + text.eval == raw
    )
    assert text.eval.startswith(" = ") and len(text.calib) > 500_000 and len(text.eval) > 500_000


def test_packaged_copy_equals_a_local_copy(tmp_path, monkeypatch):
    """The same text as a local shared/data copy would give (so the demo's table is unchanged)."""
    import lzma

    d = tmp_path / "wikitext-2-raw"
    d.mkdir()
    (d / "wiki.test.raw").write_bytes(lzma.open(datasets.PACKAGED_WIKITEXT).read())
    local = datasets.load_text("wikitext2", str(tmp_path))
    monkeypatch.setattr(datasets, "_candidate_dirs", lambda data_dir: [])
    packaged = datasets.load_text("wikitext2")
    assert (local.calib, local.eval) == (packaged.calib, packaged.eval)


def test_unreachable_hub_fails_within_seconds(fresh_clone):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        datasets.load_text("c4").eval
    assert time.perf_counter() - t0 < 10  # the datasets library retried for minutes before
    msg = str(err.value)
    assert "unreachable" in msg and "--data-dir" in msg and "RSQ_DATA_DIR" in msg and "\n" not in msg


def test_offline_mode_fails_at_once(fresh_clone, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "PACKAGED_WIKITEXT", datasets.PACKAGED_WIKITEXT.with_name("missing.xz"))
    with pytest.raises(ConfigError, match=r"HF_HUB_OFFLINE.*--data-dir DIR \(or set RSQ_DATA_DIR\)"):
        datasets.load_text("wikitext2")
