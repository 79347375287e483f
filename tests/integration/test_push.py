"""`rsq push DIR REPO` up to the network boundary: with the hub unreachable, one line and exit 2."""

import os
import subprocess
import sys
from pathlib import Path

from rsq.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def _push(*argv, **env):
    full = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    full.update(PYTHONPATH=str(ROOT), HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_x", **env)
    return subprocess.run(
        [sys.executable, "-m", "rsq", "push", *argv], capture_output=True, text=True, env=full, timeout=120
    )


def test_push_unreachable_hub_is_one_line_exit_2(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    run = _push(str(tmp_path / "ckpt"), "org/name")
    assert run.returncode == 2, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith("rsq: error: could not create the repository org/name on the Hugging Face hub")
    assert "HF_TOKEN" in lines[0]
    offline = _push(str(tmp_path / "ckpt"), "org/name", HF_HUB_OFFLINE="1")
    assert offline.returncode == 2 and len(offline.stderr.strip().splitlines()) == 1, offline.stderr


def test_push_checks_the_directory_and_repo_id(tmp_path, capsys):
    assert main(["push", str(tmp_path), "org/name"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert main(["push", str(tmp_path), "a/b/c"]) == 2
    assert "ORG/NAME" in capsys.readouterr().err
