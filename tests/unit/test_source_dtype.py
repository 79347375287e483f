"""rsq.io.hf.source_dtype (the checkpoint's unquantized dtype of a float32 run): where the source's
config cannot be read it warns and keeps the run's dtype; other errors are not swallowed (issue 32)."""

import logging

import pytest

import rsq.io.loading
from rsq.errors import ConfigError
from rsq.io.hf import source_dtype


def test_unreadable_config_warns_and_falls_back(monkeypatch, caplog):
    def unreachable(source):
        raise ConfigError(f"could not load model {source!r} (We couldn't connect to 'https://huggingface.co')")

    monkeypatch.setattr(rsq.io.loading, "load_config", unreachable)
    with caplog.at_level(logging.WARNING, logger="rsq.io.hf"):
        assert source_dtype("org/model") is None
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "org/model" in warned[0] and "--save-dtype" in warned[0], warned


def test_other_errors_are_not_swallowed(monkeypatch):
    def bug(source):
        raise TypeError("a bug, not an unreachable hub")

    monkeypatch.setattr(rsq.io.loading, "load_config", bug)
    with pytest.raises(TypeError, match="a bug"):
        source_dtype("org/model")
