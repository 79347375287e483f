"""Progress for the CLI (library code reports through callbacks and log events, never prints).

Where stderr is a terminal: one tqdm bar per stage, erased when done. Elsewhere (a log file, a
pipe, a scheduler): no bars, and the library's events (rsq.log: one per finished layer, one per
evaluated source) become one text line each, or one JSON object per line with ``--log-format json``.
``--quiet``: neither. :func:`configure` (called by rsq.cli.main) picks the mode.

Text line (a local timestamp, then the event)::

    [2026-12-06 13:40:01] layer 3/30 done in 12.4s (hessian 2.1s, solve 8.0s, propagate 2.3s); worst
        rel loss 0.0123 (mlp.down_proj); elapsed 37.5s, ETA 5m13s; peak host 2.31 GiB (one line)
    [2026-12-06 13:52:40] perplexity wikitext2 37.23 (40 windows of 512 tokens, 41.0s)

JSON line: ``{"time": "2026-12-06T13:40:01+00:00", "event": "layer", "layer": 3, ...}`` (the fields
of rsq.log's events, a UTC timestamp first).
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime, timezone

from tqdm import tqdm

from rsq import jsonsafe
from rsq.log import EVENTS

MODES = ("bars", "text", "json", "quiet")
_state = {"mode": "bars"}


def choose_mode(quiet: bool = False, log_format: str = "auto", isatty: bool | None = None) -> str:
    """bars on a terminal, text lines elsewhere; ``log_format`` text/json forces lines; quiet: none."""
    if quiet:
        return "quiet"
    if log_format in ("text", "json"):
        return log_format
    if isatty is None:
        isatty = _stderr_isatty()
    return "bars" if isatty else "text"


def _stderr_isatty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _StderrHandler(logging.Handler):
    """Writes to the current sys.stderr (looked up at each record: tests and redirections swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a closed or broken log stream must not stop the run
            self.handleError(record)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        return f"[{stamp}] {record.getMessage()}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="seconds")
        fields = getattr(record, "rsq_event", None) or {"event": "message", "message": record.getMessage()}
        return jsonsafe.dumps({"time": stamp, **fields})  # NaN/Inf as null: strict JSON for parsers


def configure(mode: str) -> None:
    """Route rsq.log's events as ``mode`` says (replacing an earlier configuration)."""
    if mode not in MODES:
        raise ValueError(f"unknown progress mode {mode!r}")
    _state["mode"] = mode
    for handler in list(EVENTS.handlers):
        if isinstance(handler, _StderrHandler):
            EVENTS.removeHandler(handler)
    EVENTS.propagate = False  # the CLI owns these records (no second copy through the root logger)
    if mode in ("text", "json"):
        handler = _StderrHandler()
        handler.setFormatter(JsonFormatter() if mode == "json" else TextFormatter())
        EVENTS.addHandler(handler)
        EVENTS.setLevel(logging.INFO)
    else:
        EVENTS.setLevel(logging.WARNING)


def mode() -> str:
    return _state["mode"]


class Progress:
    """One tqdm bar per stage in bars mode; ``update(stage, done, total)`` is the callback the
    library calls. In the other modes it draws nothing (the log events say the progress)."""

    def __init__(self) -> None:
        self.bars: dict[str, tqdm] = {}

    def update(self, stage: str, done: int, total: int) -> None:
        if _state["mode"] != "bars":
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(
                total=total,
                desc=stage,
                unit="step",
                leave=False,
                file=sys.stderr,
                dynamic_ncols=True,
                disable=None,  # no bars when stderr is not a terminal (logs, pipes): errors stay one line
            )
        bar.update(done - bar.n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        for bar in self.bars.values():
            bar.close()
