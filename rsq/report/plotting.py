"""Small matplotlib helpers shared by the plots rsq writes (ablate, inspect, report)."""

from __future__ import annotations

from rsq.errors import MissingDependencyError

MATPLOTLIB_MIN = "3.7"


def require_matplotlib() -> None:
    """MissingDependencyError (one line: what to install) when matplotlib is missing or too old."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError(
            f"plots need matplotlib>={MATPLOTLIB_MIN}, which is not installed: pip install 'rsq[plot]'"
        ) from None
    from packaging.version import Version

    if Version(matplotlib.__version__) < Version(MATPLOTLIB_MIN):
        raise MissingDependencyError(
            f"plots need matplotlib>={MATPLOTLIB_MIN}, found {matplotlib.__version__}: pip install -U 'rsq[plot]'"
        )


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only), after :func:`require_matplotlib`."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain_log_yaxis(ax) -> None:
    """Log-scale y axis whose ticks read as plain numbers (1, 2, 3, 5, 10, 20, ...), not 2x10^1.

    Call it after plotting: over more than three decades only powers of ten are labelled."""
    import math

    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    decades = math.log10(hi / lo) if lo > 0 and hi > lo else 1.0
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5) if decades <= 3 else (1,)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
