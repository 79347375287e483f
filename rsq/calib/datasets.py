"""Calibration and evaluation text: sources, the held-out split, token windows.

Sources (``--calib`` / ``--ppl``):

* ``wikitext2``: a local copy first (``--data-dir``, ``$RSQ_DATA_DIR``, or ``shared/data`` next to
  the working directory or the package checkout) holding ``wiki.train.raw`` / ``wiki.test.raw``;
  else the Hugging Face hub through ``datasets`` (train split for calibration, test for perplexity).
  When only the test file exists, it is split by article: calibration windows come only from the
  first half of the articles and perplexity only from the second half.
* a path to any plain text file: it serves both roles (recorded as overlapping in results.json).
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from rsq.errors import CalibrationError, ConfigError

log = logging.getLogger(__name__)

WIKITEXT_DIRS = ("wikitext-2-raw", "wikitext-2-raw-v1", "wikitext2", ".")
_ARTICLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)


@dataclass
class TextSplit:
    """Calibration text, evaluation text and a description of where they came from."""

    calib: str
    eval: str
    description: dict


def _candidate_dirs(data_dir: str | None) -> list[Path]:
    dirs: list[Path] = []
    if data_dir:
        dirs.append(Path(data_dir))
    if os.environ.get("RSQ_DATA_DIR"):
        dirs.append(Path(os.environ["RSQ_DATA_DIR"]))
    here = Path(__file__).resolve()
    for base in (Path.cwd(), Path.cwd().parent, here.parents[2], here.parents[3]):
        dirs.append(base / "shared" / "data")
    return dirs


def find_wikitext_files(data_dir: str | None = None) -> tuple[Path | None, Path | None]:
    """(train, test) raw files from the first directory that has a test file."""
    if data_dir and not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir {data_dir} does not exist: pass a directory holding wiki.test.raw")
    for root in _candidate_dirs(data_dir):
        for sub in WIKITEXT_DIRS:
            d = root / sub
            test = d / "wiki.test.raw"
            if test.is_file():
                train = d / "wiki.train.raw"
                return (train if train.is_file() else None), test
    return None, None


def split_articles(text: str) -> list[str]:
    """Split raw wikitext into articles at top-level headings (' = Title = ')."""
    starts = [m.start() for m in _ARTICLE.finditer(text)]
    if not starts:
        return [text]
    if starts[0] > 0:
        starts.insert(0, 0)
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def _read(path: Path) -> str:
    # universal newlines: the distributed copy has CRLF line endings
    return path.read_text(encoding="utf-8")


def load_text(source: str, data_dir: str | None = None) -> TextSplit:
    """Resolve a source name or path to calibration and evaluation text."""
    path = Path(source)
    if source != "wikitext2":
        if not path.is_file():
            raise ConfigError(
                f"text source {source!r} is neither 'wikitext2' nor an existing file: pass a path to "
                "a plain text file or 'wikitext2'"
            )
        text = _read(path)
        return TextSplit(text, text, {"source": str(path), "split": "whole file for both (overlap)"})

    train, test = find_wikitext_files(data_dir)
    if test is not None:
        test_text = _read(test)
        if train is not None:
            return TextSplit(_read(train), test_text, {"source": "wikitext2", "train": str(train), "test": str(test)})
        articles = split_articles(test_text)
        half = len(articles) // 2
        return TextSplit(
            "".join(articles[:half]),
            "".join(articles[half:]),
            {
                "source": "wikitext2",
                "test": str(test),
                "split": f"test file split by article: calibration = articles 0..{half - 1}, "
                f"evaluation = articles {half}..{len(articles) - 1} (of {len(articles)})",
            },
        )
    return _load_wikitext_hub()


def _load_wikitext_hub() -> TextSplit:
    try:
        import datasets
    except ImportError as exc:
        raise ConfigError(
            "no local wikitext-2 copy found and the 'datasets' package is missing: pass --data-dir "
            "DIR (with wiki.test.raw) or install rsq[hub]"
        ) from exc
    try:
        train = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
        test = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # network/hub errors come in many types
        raise ConfigError(
            f"could not load wikitext-2 from the hub ({type(exc).__name__}): pass --data-dir DIR "
            "holding wiki.test.raw (and wiki.train.raw), or set RSQ_DATA_DIR"
        ) from exc
    return TextSplit(
        "\n\n".join(train["text"]), "\n\n".join(test["text"]), {"source": "wikitext2", "hub": "wikitext-2-raw-v1"}
    )


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole text once, without special tokens (no BOS per window, spec §1). 1-D long."""
    if not text.strip():
        raise CalibrationError("the text is empty: pass a text source with content")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids.long()


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """N windows of T tokens at uniformly random offsets (Python ``random`` seeded). (N, T) long."""
    if ids.numel() <= seqlen:
        raise CalibrationError(
            f"the calibration text has {ids.numel()} tokens, too few for --seqlen {seqlen}: use a "
            "longer text or a smaller --seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of T tokens, tail dropped (spec §8). (K, T) long."""
    count = ids.numel() // seqlen
    if count == 0:
        raise CalibrationError(
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}: use a "
            "smaller --seqlen"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].reshape(count, seqlen)
