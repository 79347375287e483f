"""Optional dependencies fail as one line naming the package and version: compressed-tensors for
rsq export, matplotlib for the plotting commands."""

import importlib.metadata
import sys

import pytest

from rsq.cli.main import main


@pytest.mark.parametrize("installed", [None, "0.14.0"])
def test_export_needs_compressed_tensors_floor(monkeypatch, capsys, tmp_path, installed):
    real = importlib.metadata.version

    def fake(name):
        if name == "compressed-tensors":
            if installed is None:
                raise importlib.metadata.PackageNotFoundError(name)
            return installed
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", fake)
    assert main(["export", str(tmp_path), "--format", "compressed-tensors", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "compressed-tensors>=0.18.0" in err[0]
    assert ("not installed" if installed is None else "found 0.14.0") in err[0]


@pytest.mark.parametrize("argv", [["report", "RUN", "--out", "R"], ["inspect", "--out", "I"]])
def test_plots_need_matplotlib(monkeypatch, capsys, argv):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib>=3.7" in err[0] and "rsq[plot]" in err[0]
