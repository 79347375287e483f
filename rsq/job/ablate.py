"""The paper's ablation as a product feature: a grid of methods × importance strategies × seeds.

Each cell is an ordinary quantize run in its own directory (``<out>/<name>-s<seed>/``); cells that
already have a results.json are kept and an unfinished cell of the same options continues from its
last finished layer, so an interrupted grid resumes. The model is loaded once per
process and copied for each cell. With several GPUs, cells run in parallel, one process per GPU.
Outputs: ``results.json`` (every cell), ``table.md`` (mean ± std over seeds), ``ppl.png`` and
``importance.png`` (per-layer token weights of one sequence, for the first strategy run).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from rsq.config import EVAL_SEQLEN, EVAL_WINDOWS, TORCH_DTYPES, RSQConfig, method_preset
from rsq.io.loading import load_model
from rsq.job.run import can_resume, run_quantize
from rsq.report.plotting import plain_log_yaxis, pyplot


def grid_cells(
    base: RSQConfig, methods: list[str], strategies: list[str], seeds: list[int]
) -> list[tuple[str, RSQConfig]]:
    """(cell name, config) for every run of the grid. ``rsq`` (and ``rsq-norot``) run once per strategy."""
    cells = []
    for seed in seeds:
        for entry in methods:
            # "<method>-norot" is the method without rotation (e.g. the paper's rsq-without-rotation)
            method = entry.removesuffix("-norot")
            preset = method_preset(method)
            rotate = preset["rotate"] and not entry.endswith("-norot")
            names = strategies if method == "rsq" else [preset["importance"]]
            algorithm = "rtn" if preset["algorithm"] == "rtn" else base.grid.format.solver
            for strategy in names:
                cfg = replace(
                    base,
                    method=method,
                    seed=seed,
                    rotation=replace(base.rotation, enabled=rotate, seed=seed),
                    importance=replace(base.importance, strategy=strategy),
                    solver=replace(base.solver, algorithm=algorithm),
                )
                label = entry if method != "rsq" else entry.replace("rsq", f"rsq-{strategy}", 1)
                cells.append((f"{label}-s{seed}", cfg))
    return cells


def run_grid(
    cells: list[tuple[str, RSQConfig]],
    out: Path,
    *,
    gpus: int = 0,
    ppl_max_windows: int = EVAL_WINDOWS,
    ppl_seqlen: int = EVAL_SEQLEN,
    progress: Callable | None = None,
) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    todo = [(name, cfg) for name, cfg in cells if not (out / name / "results.json").is_file()]
    if gpus > 1 and todo:
        _run_parallel(todo, out, gpus, ppl_max_windows, ppl_seqlen)
    elif todo:
        base = load_model(todo[0][1].model or None, TORCH_DTYPES[todo[0][1].dtype])
        for k, (name, cfg) in enumerate(todo):
            if progress:
                progress("grid", k, len(todo))
            run_quantize(
                cfg,
                out / name,
                overwrite=True,
                resume=can_resume(out / name, cfg),
                ppl_max_windows=ppl_max_windows,
                ppl_seqlen=ppl_seqlen,
                preloaded=(copy.deepcopy(base[0]), base[1]),
            )
        if progress:
            progress("grid", len(todo), len(todo))
    return [dict(json.loads((out / name / "results.json").read_text()), cell=name) for name, _ in cells]


def _worker(job: tuple) -> str:
    name, cfg_dict, out, ppl_max_windows, ppl_seqlen, device = job
    cfg = RSQConfig.from_dict({**cfg_dict, "device": device})
    run_quantize(
        cfg,
        Path(out) / name,
        overwrite=True,
        resume=can_resume(Path(out) / name, cfg),
        ppl_max_windows=ppl_max_windows,
        ppl_seqlen=ppl_seqlen,
    )
    return name


def _run_parallel(todo, out: Path, gpus: int, ppl_max_windows: int, ppl_seqlen: int) -> None:
    """One process per GPU (spawned), each taking cells round-robin."""
    import multiprocessing as mp

    jobs = [
        (name, cfg.to_dict(), str(out), ppl_max_windows, ppl_seqlen, f"cuda:{k % gpus}")
        for k, (name, cfg) in enumerate(todo)
    ]
    ctx = mp.get_context("spawn")
    # jobs are grouped per GPU so that two processes never share one device
    per_gpu = [[j for j in jobs if j[-1] == f"cuda:{g}"] for g in range(gpus)]
    with ctx.Pool(gpus) as pool:
        pool.map(_run_sequence, per_gpu)


def _run_sequence(jobs: list) -> list[str]:
    return [_worker(j) for j in jobs]


def summarize(runs: list[dict], source: str = "wikitext2") -> list[dict]:
    """Rows of (label, bits, mean ppl, std, n, per-seed values), in first-seen order."""
    groups: dict[str, list[float]] = {}
    bits: dict[str, int] = {}
    for r in runs:
        label = r["cell"].rsplit("-s", 1)[0]
        groups.setdefault(label, []).append(r["perplexity"].get(source, math.nan))
        bits[label] = r["config"]["grid"]["bits"]
    rows = []
    for label, vals in groups.items():
        rows.append(
            {
                "label": label,
                "bits": bits[label],
                "mean": statistics.fmean(vals),
                "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "n": len(vals),
                "values": vals,
            }
        )
    return rows


def markdown_table(rows: list[dict], source: str = "wikitext2") -> str:
    lines = [f"| method | bits | {source} ppl (mean ± std) | seeds | per seed |", "|---|---|---|---|---|"]
    for r in rows:
        per = ", ".join(f"{v:.2f}" for v in r["values"])
        lines.append(f"| {r['label']} | {r['bits']} | {r['mean']:.2f} ± {r['std']:.2f} | {r['n']} | {per} |")
    return "\n".join(lines) + "\n"


def plot_ppl(rows: list[dict], path: Path, source: str = "wikitext2") -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(max(6.5, 0.8 * len(rows) + 2), 4))
    x = range(len(rows))
    ax.bar(x, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=4, color="#4C72B0")
    tops = [max(r["values"] + [r["mean"] + r["std"]]) for r in rows]
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["values"]), r["values"], color="black", s=10, zorder=3)
    ax.set_xticks(list(x))
    ax.set_xticklabels([r["label"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel(f"{source} perplexity (lower is better)")
    low = min(min(r["values"]) for r in rows)
    if max(tops) / low > 10:  # orders of magnitude apart (e.g. rtn beside rsq): log axis, plain labels
        plain_log_yaxis(ax)
        ax.set_ylim(low / 1.3, max(tops) * 1.6)
        pad = [t * 1.05 for t in tops]
    else:  # close values: a linear axis that starts near the best, so differences stay visible
        span = max(tops) - low
        ax.set_ylim(max(0.0, low - 0.5 * span), max(tops) + 0.15 * span)
        pad = [t + 0.02 * span for t in tops]
    for i, r in enumerate(rows):
        ax.text(i, pad[i], f"{r['mean']:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_title("perplexity by method (bars: mean over seeds; dots: seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_importance(run_dir: Path, path: Path) -> bool:
    """Heatmap of the per-token weights of calibration sequence 0 at every layer (log scale)."""
    from safetensors.torch import load_file

    f = run_dir / "importance.safetensors"
    if not f.is_file():
        return False
    maps = load_file(str(f))
    layers = sorted(maps, key=lambda k: int(k.split(".")[1]))
    data = torch.stack([maps[k] for k in layers]).numpy()
    plt = pyplot()
    import matplotlib.colors as colors

    fig, ax = plt.subplots(figsize=(10, 4))
    im = ax.imshow(data, aspect="auto", norm=colors.LogNorm(vmin=max(data.min(), 1e-3), vmax=data.max()), cmap="magma")
    ax.set_xlabel("token position in calibration sequence 0")
    ax.set_ylabel("layer")
    ax.set_title(f"token weights w_t (mean 1 per sequence) — {run_dir.name}")
    fig.colorbar(im, ax=ax, label="weight (log)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
