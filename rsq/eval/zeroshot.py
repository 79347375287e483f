"""Zero-shot (and few-shot) accuracy through lm-evaluation-harness, on the model already in memory.

We do not re-implement any task: the loaded model (plain, fake-quant or a reloaded rsq checkpoint)
is wrapped in lm-eval's ``HFLM(pretrained=<nn.Module>, tokenizer=...)`` and the harness does the
rest, so a hub task (``piqa``, ``hellaswag``, ...) runs unchanged whenever the hub is reachable.

Metric choice (spec §8, the paper's rule): for each reported task the first metric present among
:data:`METRIC_PRIORITY` — ``acc_norm``, then ``acc``, then ``exact_match`` with the
``flexible-extract`` filter, then the other exact-match filters. PIQA, HellaSwag, ARC-e and ARC-c
therefore report acc_norm; WinoGrande and LAMBADA report acc; GSM8K flexible-extract exact match.

Averaging rule (``average`` in the result): the plain, unweighted mean of the chosen metric over the
*top-level* entries of lm-eval's results — every requested task, plus every member of a requested
*tag*, while a requested *group* with its own aggregate counts once and its subtasks do not count.
``lambada`` is a tag in lm-eval 0.4 (lambada_openai + lambada_standard, no aggregate), so it counts
as two entries: the paper's 6 zero-shot names give 7 averaged entries, as its ``acc_avg``. Tasks
with no accuracy-like metric (e.g. perplexity-only ones) are reported but not averaged.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from rsq.errors import ConfigError
from rsq.models.device import resolve_device

log = logging.getLogger(__name__)

LOCAL_TASKS = Path(__file__).resolve().parent / "tasks"
"""Directory of rsq's own lm-eval task YAMLs; always on the include path."""

METRIC_PRIORITY: tuple[tuple[str, str], ...] = (
    ("acc_norm", "none"),
    ("acc", "none"),
    ("exact_match", "flexible-extract"),
    ("exact_match", "strict-match"),
    ("exact_match", "none"),
)
"""(metric, filter) pairs in the order the reported metric is chosen (spec §8)."""

PAPER_ZERO_SHOT = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "lambada")


def choose_metric(task_result: dict[str, Any]) -> tuple[str, float, float | None] | None:
    """(``"metric,filter"``, value, stderr) of the first metric in METRIC_PRIORITY that the task has,
    or None when it has none. ``task_result`` is one entry of lm-eval's ``results["results"]``."""
    for metric, filt in METRIC_PRIORITY:
        key = f"{metric},{filt}"
        value = task_result.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            stderr = task_result.get(f"{metric}_stderr,{filt}")
            stderr = float(stderr) if isinstance(stderr, (int, float)) and not isinstance(stderr, bool) else None
            return key, float(value), stderr
    return None


def top_level_entries(raw: dict[str, Any]) -> list[str]:
    """Names in ``raw["results"]`` that are not a subtask of another reported group."""
    children: set[str] = set()
    for subtasks in (raw.get("group_subtasks") or {}).values():
        children.update(subtasks)
    return [name for name in raw["results"] if name not in children]


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's output -> rsq's JSON-safe summary: chosen metric per entry and the average.

    Returns ``{"tasks": {name: {"metric", "value", "stderr", "metrics": {all numeric}}},
    "average", "averaged": [names], "rule"}``; ``average`` is NaN when nothing was averaged.
    """
    tasks: dict[str, dict] = {}
    for name, res in raw["results"].items():
        numeric = {
            k: float(v) for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and "," in k
        }
        chosen = choose_metric(res)
        tasks[name] = {
            "metric": chosen[0] if chosen else None,
            "value": chosen[1] if chosen else None,
            "stderr": chosen[2] if chosen else None,
            "metrics": numeric,
        }
    averaged = [n for n in top_level_entries(raw) if tasks[n]["value"] is not None]
    values = [tasks[n]["value"] for n in averaged]
    return {
        "tasks": tasks,
        "average": sum(values) / len(values) if values else math.nan,
        "averaged": averaged,
        "rule": "plain mean of the chosen metric (first of acc_norm, acc, exact_match flexible-extract, "
        "...) over top-level entries; a tag such as lambada counts each member, a group with an "
        "aggregate counts once",
    }


def _task_manager(tasks: list[str], include_path: list[Path]):
    """lm-eval TaskManager. Indexing the ~15k built-in tasks takes ~10 s, so when every requested
    name is found on the include path alone, the built-ins are not indexed."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_path]
    try:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    except TypeError:  # an lm-eval without include_defaults
        pass
    return TaskManager(include_path=paths)


def make_lm(model: nn.Module, tokenizer, *, batch_size: int = 8, max_length: int | None = None):
    """lm-eval's HFLM around an already loaded causal LM (kept on its current device)."""
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ConfigError("lm-eval is not installed: pip install 'rsq[eval]' (lm-eval>=0.4.5,<0.5)") from exc
    kw = {"max_length": max_length} if max_length else {}
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kw)


def evaluate_raw(
    lm,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Path | list | None = None,
    log_samples: bool = False,
    apply_chat_template: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on an LM object, with rsq's local tasks on the include path.

    Errors from lm-eval about unknown tasks or unreachable data become ConfigError with the fix.
    """
    import lm_eval

    paths = [LOCAL_TASKS]
    if include_path:
        extra = include_path if isinstance(include_path, (list, tuple)) else [include_path]
        for p in extra:
            if not Path(p).is_dir():
                raise ConfigError(f"--include-path {p} is not a directory: pass a directory of lm-eval task YAMLs")
            paths.append(Path(p))
    manager = _task_manager(tasks, paths)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: check the names (`lm_eval ls tasks`) or pass "
            "--include-path DIR with their YAML"
        )
    try:
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            apply_chat_template=apply_chat_template,
            fewshot_as_multiturn=apply_chat_template,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    except (ConnectionError, OSError) as exc:
        offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ConfigError(
            f"lm-eval could not load the data of {', '.join(tasks)} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}): the task data comes from the Hugging Face hub"
            + (" and HF_*_OFFLINE=1 is set" if offline else "")
            + "; run where the hub is reachable (or the datasets cache holds the data), or use a local task "
            "with --include-path"
        ) from exc
    if raw is None:  # non-zero ranks under accelerate return None
        raise ConfigError("lm-eval returned no results (multi-process launch?): run rsq lm-eval in one process")
    return raw


@dataclass(frozen=True)
class LmEvalOptions:
    """How :func:`run_lm_eval` runs the harness. ``limit`` caps documents per task (int) or a
    fraction (<1), for quick checks only: scores with a limit are not comparable to published ones.
    With ``log_samples`` the result also holds ``samples[task] = [{"doc_id", "target",
    "loglikelihoods" | "response", "correct": {metric: v}}]``."""

    batch_size: int = 8
    limit: int | float | None = None
    num_fewshot: int | None = None
    include_path: str | Path | list | None = None
    log_samples: bool = False
    apply_chat_template: bool = False
    seed: int = 0


def run_lm_eval(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    options: LmEvalOptions | None = None,
    *,
    device: str = "auto",
    **fields,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on an in-memory model as ``options`` say (:class:`LmEvalOptions`;
    ``fields`` replace some of its fields); return :func:`summarize`'s dict plus run facts. The
    model is moved to ``device`` (auto: CUDA when present)."""
    opts = replace(options or LmEvalOptions(), **fields)
    if not tasks:
        raise ConfigError("no lm-eval tasks given: pass --tasks, e.g. --tasks " + ",".join(PAPER_ZERO_SHOT))
    import lm_eval

    model.to(resolve_device(device))
    lm = make_lm(model, tokenizer, batch_size=opts.batch_size)
    raw = evaluate_raw(
        lm,
        tasks,
        limit=opts.limit,
        num_fewshot=opts.num_fewshot,
        include_path=opts.include_path,
        log_samples=opts.log_samples,
        apply_chat_template=opts.apply_chat_template,
        seed=opts.seed,
    )
    out = summarize(raw)
    out.update(
        {
            "kind": "lm_eval",
            "requested": list(tasks),
            "limit": opts.limit,
            "num_fewshot": opts.num_fewshot,
            "n_samples": {k: v for k, v in (raw.get("n-samples") or {}).items()},
            "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        }
    )
    if opts.log_samples:
        out["samples"] = sample_records(raw)
    return out


def sample_records(raw: dict[str, Any]) -> dict[str, list[dict]]:
    """Per-document responses in JSON-safe form (for identity checks and debugging)."""
    records: dict[str, list[dict]] = {}
    for task, samples in (raw.get("samples") or {}).items():
        rows = []
        for s in samples:
            resps = s.get("filtered_resps", [])
            row: dict[str, Any] = {"doc_id": s["doc_id"], "target": s.get("target")}
            if resps and isinstance(resps[0], (tuple, list)):
                row["loglikelihoods"] = [float(r[0]) for r in resps]
            else:
                row["response"] = [str(r) for r in resps]
            row["correct"] = {m: s[m] for m in s.get("metrics", []) if isinstance(s.get(m), (int, float))}
            rows.append(row)
        records[task] = sorted(rows, key=lambda r: r["doc_id"])
    return records
