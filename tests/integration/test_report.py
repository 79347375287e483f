"""`rsq report` on run directories written in the formats of rsq quantize (results.json), rsq lm-eval
and rsq longctx (--json-out): table values, checkpoint sizes, plots, and the errors."""

from __future__ import annotations

import argparse
import json

import pytest

from rsq.errors import ConfigError
from rsq.report.compare import load_run, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(method: str, bits: int, ppl: float, strategy: str = "uniform") -> dict:
    # the keys rsq/job/run.py writes that the report reads
    return {
        "model": "tiny",
        "method": method,
        "seed": 0,
        "config": {"grid": {"bits": bits, "group_size": -1}, "importance": {"strategy": strategy}},
        "perplexity": {"seqlen": 512, "max_windows": 40, "wikitext2": ppl},
        "timings": {"total": 12.5},
    }


def _lm_eval(acc: float) -> dict:
    return {
        "kind": "lm_eval",
        "tasks": {
            "rsq_facts": {"metric": "acc_norm,none", "value": acc, "stderr": 0.1, "metrics": {}},
            "piqa": {"metric": "acc_norm,none", "value": 0.6, "stderr": 0.01, "metrics": {}},
        },
        "average": (acc + 0.6) / 2,
        "averaged": ["rsq_facts", "piqa"],
    }


def _longctx(acc_end: float) -> dict:
    lengths = [
        {
            "items": n,
            "tokens": 21.0 * n,
            "n": 3,
            "accuracy": (1 + acc_end) / 3,
            "by_position": {"start": 1.0, "middle": 0.0, "end": acc_end},
        }
        for n in (100, 300)
    ]
    return {
        "kind": "longctx",
        "tasks": {
            "lines": {
                "accuracy": (1 + acc_end) / 3,
                "positions": ["start", "middle", "end"],
                "by_position": {"start": 1.0, "middle": 0.0, "end": acc_end},
                "lengths": lengths,
                "skipped": [],
            }
        },
    }


@pytest.fixture
def runs(tmp_path):
    specs = [
        ("fp16", "fp16", 16, 20.0, 0.7, 1.0, 4000),
        ("gptq-w3", "gptq", 3, 30.0, 0.5, 0.0, 1000),
        ("rsq-w3", "rsq", 3, 25.0, 0.6, 1.0, 1100),
        ("gptq-w4", "gptq", 4, 22.0, 0.65, 1.0, 1300),
    ]
    dirs = []
    for name, method, bits, ppl, acc, end, size in specs:
        d = tmp_path / name
        d.mkdir()
        (d / "results.json").write_text(
            json.dumps(_results(method, bits, ppl, "attncon" if method == "rsq" else "uniform"))
        )
        (d / "model.safetensors").write_bytes(b"\0" * size)
        (d / "importance.safetensors").write_bytes(b"\0" * 999)  # not part of the checkpoint size
        (d / "config.json").write_text("{}")
        (d / "tokenizer.json").write_text("{}")
        (d / "lm_eval.json").write_text(json.dumps(_lm_eval(acc)))
        (d / "longctx.json").write_text(json.dumps(_longctx(end)))
        (d / "eval-2048.json").write_text(
            json.dumps({"model": "x", "perplexity": {"seqlen": 2048, "wikitext2": ppl - 1}})
        )
        dirs.append(d)
    return dirs


def test_run_directory_is_read_completely(runs):
    r = load_run(runs[2])
    assert (r.method, r.bits, r.detail, r.size_bytes) == ("rsq", 3, "attncon", 1100)
    assert r.ppl == {"wikitext2@512": 25.0, "wikitext2@2048": 24.0}
    assert r.tasks == {"rsq_facts": 0.6, "piqa": 0.6} and r.average == pytest.approx(0.6)
    assert r.retrieval["lines"]["by_position"]["start"] == 1.0
    assert sorted(r.sources) == ["eval-2048.json", "lm_eval.json", "longctx.json", "results.json"]
    assert load_run(runs[0]).bits == 16


def test_report_files_table_and_plots(runs, tmp_path):
    out = tmp_path / "report"
    summary = write_report(runs, out)
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| rsq-w3 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    got = dict(zip(header, cells))
    assert got["method"] == "rsq (attncon)" and got["bits"] == "3"
    assert got["size MiB"] == f"{1100 / 2**20:.1f}"
    assert got["ppl wikitext2@512"] == "25.00" and got["ppl wikitext2@2048"] == "24.00"
    assert got["rsq_facts (acc_norm)"] == "60.0" and got["lm-eval avg"] == "60.0"
    assert got["retrieval lines"] == "66.7"
    assert "<table>" in html and "rsq (attncon)" in html
    assert set(summary["plots"]) == {"ppl_vs_bits.png", "accuracy.png", "retrieval.png", "retrieval_grid.png"}
    for name in summary["plots"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"]({name})" in md and f"src='{name}'" in html
    assert json.loads((out / "report.json").read_text())["rows"] == summary["rows"]


def test_plots_are_skipped_without_data(tmp_path):
    d = tmp_path / "only-ppl"
    d.mkdir()
    (d / "results.json").write_text(json.dumps(_results("rtn", 4, 40.0)))
    summary = write_report([d], tmp_path / "rep")
    assert summary["plots"] == ["ppl_vs_bits.png"]


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no results.json"):
        load_run(tmp_path / "empty")


def test_cli_report(runs, tmp_path, capsys):
    from rsq.cli.cmd_eval import add_parsers

    parser = argparse.ArgumentParser(prog="rsq")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", *map(str, runs), "--out", str(tmp_path / "r"), "--title", "t"])
    assert args.func(args) == 0
    assert "report.md" in capsys.readouterr().out
    assert (tmp_path / "r" / "report.md").read_text().startswith("# t")


def _examples(counts: dict[tuple[int, str], tuple[int, int]]) -> list[dict]:
    """longctx example rows: (items, position) -> (correct, wrong)."""
    rows = []
    for (items, pos), (good, bad) in counts.items():
        rows += [
            {"items": items, "position": pos, "correct": k < good, "tokens": 10 * items} for k in range(good + bad)
        ]
    return rows


def test_retrieval_cell_counts_grid_and_position_n(runs, tmp_path):
    from rsq.report.compare import _position_n

    # without examples: a length's n is shared equally among its positions
    assert load_run(runs[0]).retrieval["lines"]["cell_n"] == {
        (n, p): 1 for n in (100, 300) for p in ("start", "middle", "end")
    }
    # with examples (what rsq longctx writes): counted per cell, here unequal
    d = tmp_path / "kv-run"
    d.mkdir()
    rows = _examples({(3, "start"): (2, 1), (3, "end"): (0, 3), (6, "start"): (1, 1), (6, "end"): (1, 0)})
    data = {
        "kind": "longctx",
        "tasks": {
            "kv": {
                "accuracy": 4 / 9,
                "positions": ["start", "end"],
                "by_position": {"start": 0.6, "end": 0.25},
                "lengths": [
                    {
                        "items": 3,
                        "tokens": 30.0,
                        "n": 6,
                        "accuracy": 2 / 6,
                        "by_position": {"start": 2 / 3, "end": 0.0},
                    },
                    {"items": 6, "tokens": 60.0, "n": 3, "accuracy": 2 / 3, "by_position": {"start": 0.5, "end": 1.0}},
                ],
                "examples": rows,
            }
        },
    }
    (d / "longctx-kv.json").write_text(json.dumps(data))
    kv = load_run(d)
    assert kv.retrieval["kv"]["cell_n"] == {(3, "start"): 3, (3, "end"): 3, (6, "start"): 2, (6, "end"): 1}
    assert _position_n([kv], "kv", "start") == "5" and _position_n([kv], "kv", "end") == "4"
    # one grid row per task; the run without kv leaves an empty panel
    summary = write_report([runs[0], runs[1], d], tmp_path / "rep")
    assert "retrieval_grid.png" in summary["plots"]
    assert (tmp_path / "rep" / "retrieval_grid.png").read_bytes()[:8] == PNG_MAGIC


def test_log_axis_labels_are_plain_numbers():
    from rsq.report.compare import _plt
    from rsq.report.plotting import plain_log_yaxis

    plt = _plt()
    fig, ax = plt.subplots()
    ax.bar([0, 1], [38.0, 460.0])
    plain_log_yaxis(ax)
    ax.set_ylim(20, 600)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    plt.close(fig)
    assert {"30", "50", "100", "200", "500"} <= set(labels)
    assert not any("times" in t or "^" in t for t in labels)
