"""Progress events for a person (or a scheduler) reading a log: one record per finished layer and
one per evaluated source.

The library emits them on the logger ``rsq.events`` at INFO level, the event's fields in
``record.rsq_event`` (a dict, JSON-able); it never prints. The CLI (rsq/cli/progress.py) decides how
they look: nothing while stderr is a terminal (the bars show progress) or with ``--quiet``, else one
text line per event, or one JSON object per line with ``--log-format json``. Python API users see
them by enabling the logger (``logging.getLogger("rsq.events").setLevel(logging.INFO)`` + a handler).
"""

from __future__ import annotations

import logging
import time

EVENTS = logging.getLogger("rsq.events")

_SKIP_STAGES = ("total",)


def emit(event: str, message: str, **fields) -> None:
    """One event: ``message`` is the text line's body, ``fields`` the JSON object's content."""
    if EVENTS.isEnabledFor(logging.INFO):
        EVENTS.info(message, extra={"rsq_event": {"event": event, **fields}})


def duration(seconds: float) -> str:
    """12.3s, 4m05s, 2h03m: short, fixed shapes (for the ETA of a 70B run as of a 135M one)."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def host_peak_gib() -> float:
    """This process's peak resident memory so far (ru_maxrss, KiB on Linux), GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def gpu_peak_gib() -> float | None:
    """The peak GPU memory allocated by torch so far (GiB); None when CUDA was not used."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1024**3
    return None


class LayerLog:
    """Per-layer events of one quantization session. Made before the layer loop; ``layer_done``
    is called after each finished layer with the pipeline's RunState (cumulative stage timings,
    per-layer reports): the event holds that layer's stage times (differences of the cumulative
    ones; the first layer's include the capture of the layer-0 inputs), its worst relative loss,
    the elapsed time and the estimated remaining time (mean of this session's layers so far)."""

    def __init__(self, n_layers: int, start_layer: int, timings: dict[str, float] | None = None) -> None:
        self.n_layers = n_layers
        self.start_layer = start_layer
        self.t0 = time.perf_counter()
        self.last = dict(timings or {})

    def layer_done(self, index: int, state) -> None:
        now = time.perf_counter()
        stages = {k: v - self.last.get(k, 0.0) for k, v in state.timings.items() if k not in _SKIP_STAGES}
        stages = {k: round(v, 3) for k, v in stages.items() if v > 0}  # the stages that ran for this layer
        self.last = dict(state.timings)
        report = next((r for r in reversed(state.layers) if r.index == index), None)
        rel = dict(getattr(report, "rel_losses", None) or {})
        worst = max(rel, key=rel.get) if rel else None
        done = index + 1 - self.start_layer
        elapsed = now - self.t0
        eta = elapsed / max(done, 1) * (self.n_layers - index - 1)
        fields = {
            "layer": index + 1,
            "layers": self.n_layers,
            "seconds": round(report.seconds, 3) if report is not None else None,
            "stages": stages,
            "worst_rel_loss": rel[worst] if worst else None,
            "worst_module": worst,
            "elapsed_s": round(elapsed, 1),
            "eta_s": round(eta, 1),
            "host_peak_GiB": round(host_peak_gib(), 3),
            "gpu_peak_GiB": None if (g := gpu_peak_gib()) is None else round(g, 3),
        }
        parts = ", ".join(f"{k} {duration(v)}" for k, v in stages.items())
        text = f"layer {index + 1}/{self.n_layers}"
        if report is not None:
            text += f" done in {duration(report.seconds)}"
        if parts:
            text += f" ({parts})"
        if worst:
            text += f"; worst rel loss {rel[worst]:.3g} ({worst})"
        text += f"; elapsed {duration(elapsed)}, ETA {duration(eta)}; peak host {fields['host_peak_GiB']:.2f} GiB"
        if fields["gpu_peak_GiB"] is not None:
            text += f", GPU {fields['gpu_peak_GiB']:.2f} GiB"
        emit("layer", text, **fields)


def eval_done(source: str, value: float, windows: int, seqlen: int, seconds: float) -> None:
    """One evaluated perplexity source."""
    emit(
        "eval",
        f"perplexity {source} {value:.2f} ({windows} windows of {seqlen} tokens, {duration(seconds)})",
        source=source,
        perplexity=value,
        windows=windows,
        seqlen=seqlen,
        seconds=round(seconds, 3),
    )
