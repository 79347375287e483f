"""Progress bars for the CLI (library code reports through callbacks and never prints)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """One tqdm bar per stage; ``update(stage, done, total)`` is the callback the library calls."""

    def __init__(self) -> None:
        self.bars: dict[str, tqdm] = {}

    def update(self, stage: str, done: int, total: int) -> None:
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
