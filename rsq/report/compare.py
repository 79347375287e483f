"""`rsq report RUN_DIR... --out DIR`: one comparison of several runs, as markdown, HTML and PNGs.

Inputs, per run directory (the run's own files stay the machine-readable source):

* ``results.json`` of ``rsq quantize`` (method, config with bits and group size, perplexity with its
  window length, timings); optional, so that a directory holding only evaluations also works;
* any other ``*.json`` in the directory written by the evaluation commands, recognised by content:
  ``rsq lm-eval --json-out`` (``"kind": "lm_eval"``), ``rsq longctx --json-out`` (``"kind":
  "longctx"``) and ``rsq eval --json-out`` (a ``perplexity`` dict and no ``method``). Convention:
  ``RUN/lm_eval.json``, ``RUN/longctx.json``, ``RUN/eval-<seqlen>.json``;
* ``*.safetensors`` sizes (the checkpoint on disk; ``importance.safetensors`` is not counted).

Outputs in ``DIR``: ``report.md``, ``report.html`` (same content), ``report.json`` (the table rows),
and where the data exists ``ppl_vs_bits.png`` (one panel per perplexity source and window length;
a line per method over its bit widths, or with a single bit width a bar per method; each run a dot;
unquantized runs as dashed horizontal references), ``accuracy.png`` (lm-eval chosen metric per
task and the average, one bar per run), ``retrieval.png`` (long-context accuracy by gold position
over all lengths and by length over all positions, one column per task, one bar or line per run)
and ``retrieval_grid.png`` (accuracy per length × gold position, one heat map per task and run).
Perplexity is "perplexity source@window length"; several runs of one method at one bit width are
averaged in the plot (the table lists every run).
"""

from __future__ import annotations

import html
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from rsq.errors import ConfigError
from rsq.report.plotting import plain_log_yaxis, pyplot

log = logging.getLogger(__name__)

SKIP_JSON = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "results.json",
    "state.json",
    "vocab.json",
    "added_tokens.json",
    "model.safetensors.index.json",
    "chat_template.json",
    "preprocessor_config.json",
}
MAX_JSON_BYTES = 64 * 2**20
UNQUANTIZED_BITS = 16


@dataclass
class Run:
    """Everything the report knows about one run directory."""

    name: str
    path: Path
    method: str
    bits: int
    group_size: int | None = None
    detail: str = ""
    size_bytes: int = 0
    ppl: dict[str, float] = field(default_factory=dict)  # "source@seqlen" -> ppl
    tasks: dict[str, float] = field(default_factory=dict)  # lm-eval entry -> chosen metric value
    task_metric: dict[str, str] = field(default_factory=dict)
    average: float | None = None
    retrieval: dict[str, dict] = field(default_factory=dict)  # task -> {"accuracy", "by_position", "lengths"}
    bench: dict[str, float] = field(default_factory=dict)  # long benchmark file -> mean score
    seconds: float | None = None
    sources: list[str] = field(default_factory=list)

    @property
    def quantized(self) -> bool:
        return self.bits < UNQUANTIZED_BITS


def _ppl_entries(block: dict) -> dict[str, float]:
    seqlen = block.get("seqlen")
    return {
        f"{k}@{seqlen}": float(v)
        for k, v in block.items()
        if k not in ("seqlen", "max_windows") and isinstance(v, (int, float))
    }


def _read_json(path: Path) -> dict | None:
    if path.stat().st_size > MAX_JSON_BYTES:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.warning("skipping %s: not JSON (%s)", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _checkpoint_bits(path: Path) -> tuple[str, int, int | None] | None:
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    data = _read_json(cfg) or {}
    qc = data.get("quantization_config") or {}
    if qc.get("quant_method") == "rsq":
        return str(qc.get("method", "rsq")), int(qc.get("bits", UNQUANTIZED_BITS)), qc.get("group_size")
    return None


def _cell_counts(task_result: dict) -> dict[tuple[int, str], int]:
    """Scored prompts per (item count, position): counted from the examples when the JSON has them,
    else the length's n shared equally among its positions."""
    counts: dict[tuple[int, str], int] = {}
    examples = task_result.get("examples")
    if examples:
        for e in examples:
            key = (int(e["items"]), str(e["position"]))
            counts[key] = counts.get(key, 0) + 1
        return counts
    for length in task_result.get("lengths") or []:
        positions = list(length.get("by_position") or {})
        for p in positions:
            counts[(int(length["items"]), p)] = int(length.get("n", 0)) // max(len(positions), 1)
    return counts


def load_run(path: str | Path) -> Run:
    """Collect one run directory (see the module doc); ConfigError when it holds nothing to report."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"run directory {p} does not exist: pass directories written by rsq quantize")
    results = _read_json(p / "results.json") if (p / "results.json").is_file() else None
    if results is not None:
        run = _run_from_results(p, results)
    else:
        ck = _checkpoint_bits(p)
        method, bits, gs = ck if ck else ("unquantized", UNQUANTIZED_BITS, None)
        run = Run(p.name, p, method, bits, gs)
    run.size_bytes = sum(f.stat().st_size for f in p.glob("*.safetensors") if f.name != "importance.safetensors")

    for f in sorted(p.glob("*.json")):
        if f.name in SKIP_JSON or f.name.startswith("tokenizer"):
            continue
        data = _read_json(f)
        if data and _add_evaluation(run, data):
            run.sources.append(f.name)
    if not run.sources:
        raise ConfigError(
            f"{p} has no results.json and no evaluation JSON (rsq lm-eval/longctx/eval --json-out): pass a run "
            "directory of rsq quantize, or write evaluations into it first"
        )
    return run


def _run_from_results(p: Path, results: dict) -> Run:
    """A run from its results.json (rsq quantize's): method, bits, perplexities, time."""
    method = str(results.get("method", "?"))
    grid = (results.get("config") or {}).get("grid") or {}
    bits = UNQUANTIZED_BITS if method == "fp16" else int(grid.get("bits", UNQUANTIZED_BITS))
    run = Run(p.name, p, method, bits, grid.get("group_size") if method != "fp16" else None)
    imp = ((results.get("config") or {}).get("importance") or {}).get("strategy")
    if method == "rsq" and imp:
        run.detail = imp
    run.ppl.update(_ppl_entries(results.get("perplexity") or {}))
    run.seconds = (results.get("timings") or {}).get("total")
    run.sources.append("results.json")
    return run


def _add_evaluation(run: Run, data: dict) -> bool:
    """Add one evaluation JSON (lm-eval, longctx or perplexity) to ``run``; False for other JSON."""
    kind = data.get("kind")
    if kind == "lm_eval":
        for name, t in (data.get("tasks") or {}).items():
            if t.get("value") is not None:
                run.tasks[name] = float(t["value"])
                run.task_metric[name] = str(t.get("metric"))
        avg = data.get("average")
        run.average = float(avg) if isinstance(avg, (int, float)) and not math.isnan(avg) else None
    elif kind == "longctx":
        for name, b in (data.get("benchmarks") or {}).items():
            if b.get("score") is not None:
                run.bench[name] = float(b["score"])
        for task, r in (data.get("tasks") or {}).items():
            run.retrieval[task] = {
                "accuracy": r.get("accuracy"),
                "by_position": r.get("by_position") or {},
                "lengths": r.get("lengths") or [],
                "positions": r.get("positions") or [],
                "cell_n": _cell_counts(r),
            }
    elif "perplexity" in data and "method" not in data and isinstance(data["perplexity"], dict):
        run.ppl.update(_ppl_entries(data["perplexity"]))
    else:
        return False
    return True


# ----------------------------------------------------------------------------- table


def _keys(runs: list[Run], attr: str) -> list[str]:
    out: list[str] = []
    for r in runs:
        for k in getattr(r, attr):
            if k not in out:
                out.append(k)
    return out


RETRIEVAL_ORDER = ("lines", "kv")
"""Synthetic retrieval tasks in the order the report shows them (others follow as found)."""


def _retrieval_tasks(runs: list[Run]) -> list[str]:
    found = _keys(runs, "retrieval")
    return [t for t in RETRIEVAL_ORDER if t in found] + [t for t in found if t not in RETRIEVAL_ORDER]


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the methods × metrics table."""
    ppl_keys, task_keys, ret_keys = _keys(runs, "ppl"), _keys(runs, "tasks"), _retrieval_tasks(runs)
    bench_keys = _keys(runs, "bench")
    header = ["run", "method", "bits", "group", "size MiB"] + [f"ppl {k}" for k in ppl_keys]
    header += [f"{k} ({_metric_name(runs, k)})" for k in task_keys]
    header += ["lm-eval avg"] if task_keys else []
    header += [f"retrieval {k}" for k in ret_keys] + [k for k in bench_keys] + ["quantize s"]
    rows = []
    for r in runs:
        row = [
            r.name,
            r.method + (f" ({r.detail})" if r.detail else ""),
            str(r.bits),
            "–" if r.group_size is None else ("channel" if r.group_size == -1 else str(r.group_size)),
            _fmt(r.size_bytes / 2**20, 1) if r.size_bytes else "–",
        ]
        row += [_fmt(r.ppl.get(k)) for k in ppl_keys]
        row += [_fmt(100 * r.tasks[k], 1) if k in r.tasks else "–" for k in task_keys]
        if task_keys:
            row.append(_fmt(100 * r.average, 1) if r.average is not None else "–")
        row += [
            _fmt(100 * r.retrieval[k]["accuracy"], 1)
            if k in r.retrieval and r.retrieval[k]["accuracy"] is not None
            else "–"
            for k in ret_keys
        ]
        row += [_fmt(100 * r.bench[k], 1) if k in r.bench else "–" for k in bench_keys]
        row.append(_fmt(r.seconds, 0))
        rows.append(row)
    return header, rows


def _metric_name(runs: list[Run], task: str) -> str:
    for r in runs:
        if task in r.task_metric:
            return r.task_metric[task].split(",")[0]
    return "?"


# ----------------------------------------------------------------------------- plots


def _plt():
    plt = pyplot()

    return plt


def _ppl_points(runs: list[Run], key: str, method: str) -> dict[int, list[float]]:
    pts: dict[int, list[float]] = {}
    for r in runs:
        if r.method == method and r.quantized and key in r.ppl and math.isfinite(r.ppl[key]):
            pts.setdefault(r.bits, []).append(r.ppl[key])
    return pts


def _draw_method(ax, i: int, method: str, pts: dict, color, bars: bool) -> None:
    """One method's perplexities ``pts`` (bits -> values): a bar at ``i`` with its runs as dots and
    the mean written on top, or a line of means over the bit widths with the runs as dots."""
    xs = sorted(pts)
    ys = [sum(pts[b]) / len(pts[b]) for b in xs]
    if bars:
        ax.bar(i, ys[0], width=0.6, color=color, alpha=0.85)
        ax.plot([i] * len(pts[xs[0]]), pts[xs[0]], "o", color="black", markersize=4, zorder=3)
        ax.annotate(
            f"{ys[0]:.1f}",
            (i, max(pts[xs[0]])),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 3),
            textcoords="offset points",
        )
    else:
        ax.plot(xs, ys, "o-", color=color, label=method, markersize=7, linewidth=2)
        for b in xs:
            ax.plot([b] * len(pts[b]), pts[b], ".", color=color, markersize=4)


def plot_ppl_vs_bits(runs: list[Run], out: Path) -> Path | None:
    """Perplexity per method over bit widths (lines), or per method at the one bit width (bars)."""
    keys = _keys(runs, "ppl")
    if not keys:
        return None
    plt = _plt()
    methods = sorted({r.method for r in runs if r.quantized})
    all_bits = sorted({r.bits for r in runs if r.quantized})
    bars = len(all_bits) == 1
    width = max(5.2, 1.3 * len(methods) + 2.0) if bars else 5.2
    fig, axes = plt.subplots(1, len(keys), figsize=(width * len(keys), 4.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes[0], keys):
        values = [r.ppl[key] for r in runs if key in r.ppl and math.isfinite(r.ppl[key])]
        if values and max(values) / max(min(values), 1e-9) > 8:
            plain_log_yaxis(ax)
        for i, method in enumerate(methods):
            pts = _ppl_points(runs, key, method)
            if pts:
                _draw_method(ax, i, method, pts, colors[i % len(colors)], bars)
        refs = [r for r in runs if not r.quantized and key in r.ppl]
        for j, r in enumerate(refs):
            ax.axhline(
                r.ppl[key],
                color="black",
                linestyle=("--", ":", "-.")[j % 3],
                linewidth=1.2,
                label=f"{r.name} (unquantized): {r.ppl[key]:.1f}",
            )
        if bars:
            ax.set_xticks(range(len(methods)))
            ax.set_xticklabels(methods)
            ax.set_xlabel(f"method ({all_bits[0]}-bit weights; bar: mean, dots: runs)")
            if values and ax.get_yscale() == "log":
                ax.set_ylim(min(values) * 0.8, max(values) * 1.4)
            else:
                ax.set_ylim(0, max(values or [1]) * 1.15)
        else:
            ax.set_xticks(all_bits or [UNQUANTIZED_BITS])
            ax.set_xlabel("weight bits (line: mean, dots: runs)")
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(f"perplexity {key}")
        ax.grid(alpha=0.3, axis="y" if bars else "both")
        if ax.get_legend_handles_labels()[0]:
            if bars:  # below the axes: bars and their value labels can fill any part of the panel
                ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
            else:
                ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "ppl_vs_bits.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _grouped_bars(
    ax, groups: list[str], series: list[tuple[str, list[float | None]]], ylabel: str, colors: list[str] | None = None
) -> None:
    n = max(len(series), 1)
    width = 0.8 / n
    for i, (label, values) in enumerate(series):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        # a measured 0 keeps a thin stub of its color, so that runs at 0 stay identifiable
        ys = [max(100 * v, 0.8) if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, ys, width=width * 0.95, label=label, color=colors[i] if colors else None)
        for b, v in zip(bars, values):
            ax.annotate(
                "n/a" if v is None else f"{100 * v:.0f}",
                (b.get_x() + b.get_width() / 2, b.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 1),
                textcoords="offset points",
            )
    longest = max(len(line) for g in groups for line in g.split("\n"))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20 if longest > 10 else 0, ha="right" if longest > 10 else "center")
    ax.set_ylim(0, 105)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def plot_accuracy(runs: list[Run], out: Path) -> Path | None:
    keys = _keys(runs, "tasks")
    with_tasks = [r for r in runs if r.tasks]
    if not keys:
        return None
    plt = _plt()
    groups = keys + ["average"]
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 1.0 + 0.35 * len(groups) * max(len(with_tasks), 2))), 4.6))
    series = [(r.name, [r.tasks.get(k) for k in keys] + [r.average]) for r in with_tasks]
    _grouped_bars(ax, groups, series, "accuracy % (chosen metric)")
    ax.set_title("lm-eval accuracy (acc_norm where present, else acc / exact match)")
    ax.legend(fontsize=8, ncol=min(len(series), 4), loc="lower center", bbox_to_anchor=(0.5, 1.08))
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_retrieval(runs: list[Run], out: Path) -> Path | None:
    """Top row: accuracy by gold position (all lengths) per task; bottom row: accuracy vs prompt tokens.
    One color per run in every panel, one legend for the figure."""
    tasks = _retrieval_tasks(runs)
    if not tasks:
        return None
    plt = _plt()
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {r.name: cycle[i % len(cycle)] for i, r in enumerate(r for r in runs if r.retrieval)}
    fig, axes = plt.subplots(2, len(tasks), figsize=(6.5 * len(tasks), 8.6), squeeze=False, layout="constrained")
    for col, task in enumerate(tasks):
        with_task = [r for r in runs if task in r.retrieval]
        positions = _keys_in_order(
            r.retrieval[task].get("positions") or list(r.retrieval[task]["by_position"]) for r in with_task
        )
        toks = [int(x["tokens"]) for r in with_task for x in r.retrieval[task]["lengths"]]
        span = f", prompts of {min(toks)}–{max(toks)} tokens" if toks else ""
        ax = axes[0][col]
        labels = [f"{p}\n(n={_position_n(with_task, task, p)})" for p in positions]
        _grouped_bars(
            ax,
            labels,
            [(r.name, [r.retrieval[task]["by_position"].get(p) for p in positions]) for r in with_task],
            "accuracy %",
            [color[r.name] for r in with_task],
        )
        ax.set_xlabel("position of the gold item (n = prompts per run)")
        ax.set_title(f"{task} retrieval by position (all lengths{span})", fontsize=10)
        ax = axes[1][col]
        for i, r in enumerate(with_task):
            lengths = [x for x in r.retrieval[task]["lengths"] if x.get("accuracy") is not None]
            if lengths:  # shrinking markers, later runs on top: equal values show as concentric rings
                ax.plot(
                    [x["tokens"] for x in lengths],
                    [100 * x["accuracy"] for x in lengths],
                    "o-",
                    color=color[r.name],
                    label=r.name,
                    markersize=4 + 2 * (len(with_task) - 1 - i),
                    linewidth=1.5,
                )
        ax.set_ylim(-3, 103)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("accuracy % (all positions)")
        ax.set_title(f"{task} retrieval by length", fontsize=10)
        ax.grid(alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in color.values()]
    fig.legend(handles, list(color), loc="outside upper center", ncol=min(len(color), 4), fontsize=9)
    path = out / "retrieval.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _position_n(runs: list[Run], task: str, position: str) -> str:
    """Prompts per run behind one position bar: one number, or min–max when the runs differ."""
    ns = {sum(n for (_, p), n in r.retrieval[task]["cell_n"].items() if p == position) for r in runs}
    return str(min(ns)) if len(ns) == 1 else f"{min(ns)}–{max(ns)}"


def plot_retrieval_grid(runs: list[Run], out: Path) -> Path | None:
    """Heat maps of accuracy per (length, gold position): one row per task, one panel per run."""
    tasks = _retrieval_tasks(runs)
    if not tasks:
        return None
    plt = _plt()
    cols = max(sum(task in r.retrieval for r in runs) for task in tasks)
    heights = [max(len(_grid_lengths(runs, t)), 1) for t in tasks]
    fig, axes = plt.subplots(
        len(tasks),
        cols,
        figsize=(2.6 + 2.6 * cols, 1.2 + sum(0.55 * h + 0.9 for h in heights)),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
        layout="constrained",
    )
    image = None
    for row, task in enumerate(tasks):
        with_task = [r for r in runs if task in r.retrieval]
        positions = _keys_in_order(
            r.retrieval[task].get("positions") or list(r.retrieval[task]["by_position"]) for r in with_task
        )
        lengths = _grid_lengths(runs, task)
        for col in range(cols):
            ax = axes[row][col]
            if col >= len(with_task):
                ax.axis("off")
                continue
            r = with_task[col]
            by_items = {x["items"]: x for x in r.retrieval[task]["lengths"]}
            grid = [[_cell(by_items.get(n), p) for p in positions] for n, _ in lengths]
            image = ax.imshow(
                [[float("nan") if v is None else 100 * v for v in line] for line in grid],
                vmin=0,
                vmax=100,
                cmap="viridis",
                aspect="auto",
            )
            for i, line in enumerate(grid):
                for j, v in enumerate(line):
                    n = r.retrieval[task]["cell_n"].get((lengths[i][0], positions[j]), 0)
                    text = "–" if v is None else f"{100 * v:.0f}"
                    ax.text(
                        j,
                        i,
                        f"{text}\nn={n}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if v is not None and v > 0.6 else "white",
                    )
            ax.set_xticks(range(len(positions)))
            ax.set_xticklabels(positions, fontsize=8)
            ax.set_yticks(range(len(lengths)))
            ax.set_yticklabels([f"{n} ({t} tok)" for n, t in lengths] if col == 0 else [], fontsize=8)
            ax.set_title(r.name, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"{task}: items (prompt tokens)", fontsize=9)
    fig.suptitle("retrieval accuracy % by length (rows) and gold position (columns)\nn = prompts per cell", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8).set_label("accuracy %", fontsize=8)
    path = out / "retrieval_grid.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _keys_in_order(lists) -> list[str]:
    out: list[str] = []
    for items in lists:
        for k in items:
            if k not in out:
                out.append(k)
    return out


def _grid_lengths(runs: list[Run], task: str) -> list[tuple[int, int]]:
    """(item count, mean prompt tokens of the first run that has it), sorted by item count."""
    seen: dict[int, int] = {}
    for r in runs:
        for x in (r.retrieval.get(task) or {}).get("lengths", []):
            seen.setdefault(int(x["items"]), int(round(x["tokens"])))
    return sorted(seen.items())


def _cell(length: dict | None, position: str) -> float | None:
    return None if length is None else length["by_position"].get(position)


# ----------------------------------------------------------------------------- documents


def _retrieval_detail(runs: list[Run]) -> list[tuple[str, list[str], list[list[str]]]]:
    """Per task: accuracy per (run, length) by position, as (title, header, rows)."""
    out = []
    for task in _retrieval_tasks(runs):
        positions: list[str] = []
        for r in runs:
            for p in (r.retrieval.get(task) or {}).get("by_position", {}):
                if p not in positions:
                    positions.append(p)
        header = ["run", "items", "prompt tokens", "n"] + positions + ["all"]
        rows = []
        for r in runs:
            for length in (r.retrieval.get(task) or {}).get("lengths", []):
                rows.append(
                    [r.name, str(length["items"]), f"{length['tokens']:.0f}", str(length["n"])]
                    + [
                        _fmt(100 * length["by_position"][p], 0) if length["by_position"].get(p) is not None else "–"
                        for p in positions
                    ]
                    + [_fmt(100 * length["accuracy"], 0) if length["accuracy"] is not None else "–"]
                )
        out.append((f"Retrieval `{task}`: accuracy % by length and gold position", header, rows))
    return out


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


NOTES = [
    "Perplexity columns are `source@window length` (non-overlapping windows, spec §8); lower is better.",
    "lm-eval columns show the chosen metric ×100 (first of acc_norm, acc, exact_match flexible-extract); "
    "the average is the plain mean over top-level entries (a tag such as lambada counts each member).",
    "Retrieval columns are accuracy ×100 over all lengths and positions that fit the model's context; "
    "leval:/icl:/lca: columns are the mean score ×100 of those benchmark files (rsq longctx --leval/--icl/--lca).",
    "Size is the checkpoint's *.safetensors on disk as stored: an unquantized run shows 16 bits whatever "
    "its storage dtype, and embeddings / lm_head are not quantized in any run.",
]


def write_report(run_dirs: list[str | Path], out: str | Path, title: str = "rsq comparison") -> dict:
    """Read the runs, write report.md / report.html / report.json and the PNGs into ``out``."""
    if not run_dirs:
        raise ConfigError("no run directories given: pass one or more RUN_DIR")
    runs = [load_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:  # disambiguate equal directory names from different parents
        if names.count(r.name) > 1:
            r.name = f"{r.path.parent.name}/{r.name}"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table(runs)
    plots = [
        p
        for p in (
            plot_ppl_vs_bits(runs, out),
            plot_accuracy(runs, out),
            plot_retrieval(runs, out),
            plot_retrieval_grid(runs, out),
        )
        if p
    ]
    details = _retrieval_detail(runs)
    captions = {
        "ppl_vs_bits.png": "Perplexity per method and weight bits",
        "accuracy.png": "lm-eval accuracy per task",
        "retrieval.png": "Long-context retrieval accuracy by gold position and by length",
        "retrieval_grid.png": "Long-context retrieval accuracy per length and gold position",
    }

    md = [f"# {title}", "", _md_table(header, rows), ""]
    md += [f"- {n}" for n in NOTES] + [""]
    for t, h, rws in details:
        md += [f"## {t}", "", _md_table(h, rws), ""]
    for p in plots:
        md += [f"## {captions[p.name]}", "", f"![{captions[p.name]}]({p.name})", ""]
    md += ["## Sources", ""] + [f"- `{r.name}`: {r.path} ({', '.join(r.sources)})" for r in runs] + [""]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")

    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
        "th,td{border:1px solid #bbb;padding:4px 8px;text-align:right}th{background:#eee}"
        "td:first-child,td:nth-child(2){text-align:left}img{max-width:100%;border:1px solid #ddd}"
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>",
        _html_table(header, rows),
        "<ul>",
    ]
    parts += [f"<li>{html.escape(n)}</li>" for n in NOTES] + ["</ul>"]
    for t, h, rws in details:
        parts += [f"<h2>{html.escape(t.replace('`', ''))}</h2>", _html_table(h, rws)]
    for p in plots:
        parts += [
            f"<h2>{html.escape(captions[p.name])}</h2>",
            f"<img src='{p.name}' alt='{html.escape(captions[p.name])}'>",
        ]
    parts += ["<h2>Sources</h2><ul>"] + [
        f"<li>{html.escape(r.name)}: {html.escape(str(r.path))} ({html.escape(', '.join(r.sources))})</li>"
        for r in runs
    ]
    parts += ["</ul></body></html>"]
    (out / "report.html").write_text("\n".join(parts), encoding="utf-8")

    summary = {
        "header": header,
        "rows": rows,
        "plots": [p.name for p in plots],
        "runs": [
            {
                "name": r.name,
                "path": str(r.path),
                "method": r.method,
                "bits": r.bits,
                "size_bytes": r.size_bytes,
                "ppl": r.ppl,
                "tasks": r.tasks,
                "average": r.average,
                "retrieval": {k: v["accuracy"] for k, v in r.retrieval.items()},
            }
            for r in runs
        ],
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
