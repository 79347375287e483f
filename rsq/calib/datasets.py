"""Calibration and evaluation text: sources, the held-out split, token windows.

Sources (``--calib`` / ``--ppl``):

* ``wikitext2``: a local copy first (``--data-dir``, ``$RSQ_DATA_DIR``, or ``shared/data`` next to
  the working directory or the package checkout) holding ``wiki.train.raw`` / ``wiki.test.raw``;
  else the copy of the test file shipped in the package (``rsq/data/wiki.test.raw.xz``: WikiText-2
  raw v1, Merity et al. 2016, CC BY-SA 3.0; see ``rsq/data/WIKITEXT.md``), so that the demo runs
  offline on a fresh clone; only where that is missing the Hugging Face hub through ``datasets``
  (train split for calibration, test for perplexity). When only the test file exists, it is split
  by article: calibration windows come only from the first half of the articles and perplexity only
  from the second half. (For the hub's train/test splits, pass ``--data-dir`` with both files.)
* ``c4``: allenai/c4 (en) as the GPTQ/QuaRot/RSQ code uses it. Perplexity text: the first
  :data:`C4_EVAL_DOCS` documents of the validation shard ``c4-validation.00000-of-00008.json.gz``
  joined by single spaces (their code then keeps the first 256 windows: ``--max-windows 256``).
  Calibration text: the first :data:`C4_CALIB_DOCS` documents of the train shard
  ``c4-train.00000-of-01024.json.gz`` joined by blank lines, windows at random offsets as for
  wikitext2 (their code draws a random document of at least T tokens per window instead, so our
  windows may cross a document boundary). Each shard comes from a local copy first (same
  directories as wikitext2, directly or under ``c4/`` or ``c4/en/``: gzipped JSON lines with a
  ``"text"`` field), else from the hub through ``datasets``; a shard is read only when its text
  is used. With only the validation shard, calibration takes the validation documents after the
  evaluation ones (disjoint from them).
* a path to any plain text file: it serves both roles (recorded as overlapping in results.json).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rsq.errors import CalibrationError, ConfigError

log = logging.getLogger(__name__)

SOURCES = ("wikitext2", "c4")
WIKITEXT_DIRS = ("wikitext-2-raw", "wikitext-2-raw-v1", "wikitext2", ".")
_ARTICLE = re.compile(r"^ = [^=].* = $", re.MULTILINE)

C4_DIRS = ("c4", "c4/en", ".")
C4_VALIDATION = "c4-validation.00000-of-00008.json.gz"
C4_TRAIN = "c4-train.00000-of-01024.json.gz"
C4_EVAL_DOCS = 1100
"""Validation documents joined for perplexity (GPTQ/QuaRot/RSQ ``valdata[:1100]``)."""
C4_CALIB_DOCS = 5000
"""Train documents joined for calibration: ~2M tokens, far more than 128 windows of 2048 need."""


@dataclass
class TextSplit:
    """Calibration text, evaluation text and a description of where they came from.

    Either text may be given as a zero-argument loader, called on first access (so that a
    perplexity-only run never reads a calibration shard).
    """

    _calib: str | Callable[[], str]
    _eval: str | Callable[[], str]
    description: dict

    @property
    def calib(self) -> str:
        if callable(self._calib):
            self._calib = self._calib()
        return self._calib

    @property
    def eval(self) -> str:
        if callable(self._eval):
            self._eval = self._eval()
        return self._eval


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


PACKAGED_WIKITEXT = Path(__file__).resolve().parents[1] / "data" / "wiki.test.raw.xz"
"""WikiText-2 raw v1 test file shipped in the package (xz; CC BY-SA 3.0, rsq/data/WIKITEXT.md)."""
PACKAGED_WIKITEXT_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
"""sha256 of the decompressed file (the distributed wiki.test.raw, CRLF line endings)."""


def find_wikitext_files(data_dir: str | None = None) -> tuple[Path | None, Path | None]:
    """(train, test) raw files from the first directory that has a test file, else (None, the
    packaged test file) where it is installed."""
    if data_dir and not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir {data_dir} does not exist: pass a directory holding wiki.test.raw")
    for root in _candidate_dirs(data_dir):
        for sub in WIKITEXT_DIRS:
            d = root / sub
            test = d / "wiki.test.raw"
            if test.is_file():
                train = d / "wiki.train.raw"
                return (train if train.is_file() else None), test
    if PACKAGED_WIKITEXT.is_file():
        return None, PACKAGED_WIKITEXT
    return None, None


def split_articles(text: str) -> list[str]:
    """Split raw wikitext into articles at top-level headings (' = Title = ')."""
    starts = [m.start() for m in _ARTICLE.finditer(text)]
    if not starts:
        return [text]
    if starts[0] > 0:
        starts.insert(0, 0)
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def read_text(path: Path) -> str:
    """The text of ``path`` (UTF-8, universal newlines: the distributed copy has CRLF line endings);
    ConfigError naming the file (and the byte offset of the first bad byte) when it is unreadable."""
    try:
        if path.suffix == ".xz":  # the packaged copy
            import lzma

            with lzma.open(path) as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as exc:  # lzma.LZMAError is an OSError
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"text file {path} is unreadable ({reason}): check the path and permissions") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"text file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start} does not "
            "decode): pass a plain UTF-8 text file"
        ) from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_text(source: str, data_dir: str | None = None) -> TextSplit:
    """Resolve a source name (wikitext2, c4) or path to calibration and evaluation text."""
    path = Path(source)
    if source == "c4":
        return load_c4(data_dir)
    if source != "wikitext2":
        if not path.is_file():
            raise ConfigError(
                f"text source {source!r} is not one of {', '.join(SOURCES)} nor an existing file: "
                "pass a path to a plain text file or a source name"
            )
        text = read_text(path)
        return TextSplit(text, text, {"source": str(path), "split": "whole file for both (overlap)"})

    train, test = find_wikitext_files(data_dir)
    if test is not None:
        test_text = read_text(test)
        if train is not None:
            return TextSplit(
                read_text(train), test_text, {"source": "wikitext2", "train": str(train), "test": str(test)}
            )
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
    why = hub_unreachable()
    if why is not None:
        raise ConfigError(
            f"no local wikitext-2 copy found and {why}: pass --data-dir DIR (or set RSQ_DATA_DIR) holding "
            "wiki.test.raw (and wiki.train.raw)"
        )
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


HUB_CONNECT_TIMEOUT = 5.0
"""Seconds to wait for a TCP connection to the hub before saying it is unreachable (the datasets
library otherwise retries for minutes, silently)."""


def hub_unreachable() -> str | None:
    """Why the hub cannot be used now, or None: offline mode is on ($HF_HUB_OFFLINE,
    $HF_DATASETS_OFFLINE), or the hub ($HF_ENDPOINT, or the HTTPS proxy when one is set) does not
    accept a TCP connection within :data:`HUB_CONNECT_TIMEOUT` seconds."""
    import socket
    from urllib.parse import urlsplit

    if any(
        os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    ):
        return "the hub is off (HF_HUB_OFFLINE)"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlsplit(proxy if proxy and endpoint.startswith("https") else endpoint)
    host, port = target.hostname, target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT).close()
    except OSError as exc:
        return f"the hub ({host}:{port}) is unreachable ({type(exc).__name__})"
    return None


# ----------------------------------------------------------------------------- c4


def find_c4_file(name: str, data_dir: str | None = None) -> Path | None:
    """The first local copy of the c4 shard ``name`` (see the module doc for the directories)."""
    if data_dir and not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir {data_dir} does not exist: pass a directory holding {name}")
    for root in _candidate_dirs(data_dir):
        for sub in C4_DIRS:
            path = root / sub / name
            if path.is_file():
                return path
    return None


def read_c4_documents(path: Path, start: int, count: int) -> list[str]:
    """The ``text`` of documents ``start .. start+count-1`` of a gzipped JSON-lines c4 shard."""
    docs: list[str] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f):
                if i >= start + count:
                    break
                if i < start or not line.strip():
                    continue
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ConfigError(
                        f"{path} line {i + 1} has no string field 'text': pass a c4 "
                        'shard (JSON lines with a "text" field)'
                    )
                docs.append(row["text"])
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{path} is not a gzipped JSON-lines c4 shard ({type(exc).__name__}: "
            f"{exc}): replace it with the file from "
            "huggingface.co/datasets/allenai/c4 (en/)"
        ) from exc
    return docs


def _c4_missing(name: str, split: str, data_dir: str | None, reason: str) -> ConfigError:
    target = data_dir or os.environ.get("RSQ_DATA_DIR") or "a directory passed as --data-dir (or $RSQ_DATA_DIR)"
    return ConfigError(
        f"c4 {split} data not found: put {name} (huggingface.co/datasets/allenai/c4, en/{name}) into {target}; {reason}"
    )


def _c4_hub_documents(name: str, split: str, start: int, count: int, data_dir: str | None) -> list[str]:
    """Documents of shard ``en/<name>`` from the hub; else ConfigError naming the local file."""
    try:
        import datasets
    except ImportError as exc:
        raise _c4_missing(name, split, data_dir, "the 'datasets' package is missing") from exc
    why = hub_unreachable()
    if why is not None:
        raise _c4_missing(name, split, data_dir, why)
    try:
        ds = datasets.load_dataset("allenai/c4", data_files={split: f"en/{name}"}, split=split)
    except Exception as exc:  # network/hub errors come in many types
        reason = f"the hub is unreachable ({type(exc).__name__})"
        raise _c4_missing(name, split, data_dir, reason) from exc
    return list(ds.select(range(min(start, len(ds)), min(start + count, len(ds))))["text"])


def _c4_documents(name: str, split: str, start: int, count: int, data_dir: str | None, where: dict) -> list[str]:
    """Documents ``start..start+count-1`` of a shard, local copy first; origin into ``where``."""
    local = find_c4_file(name, data_dir)
    if local is not None:
        where[split] = str(local)
        docs = read_c4_documents(local, start, count)
    else:
        docs = _c4_hub_documents(name, split, start, count, data_dir)
        where[split] = f"hub allenai/c4 en/{name}"
    if not docs:
        raise ConfigError(f"c4 {split} shard {where[split]} has no documents from index {start}: pass a complete shard")
    return docs


def load_c4(data_dir: str | None = None) -> TextSplit:
    """c4 calibration and evaluation text (module doc); each shard is read on first use."""
    if data_dir and not Path(data_dir).is_dir():
        raise ConfigError(f"--data-dir {data_dir} does not exist: pass a directory holding {C4_VALIDATION}")
    description: dict = {"source": "c4", "eval_documents": C4_EVAL_DOCS, "eval_join": "space"}

    def eval_text() -> str:
        docs = _c4_documents(C4_VALIDATION, "validation", 0, C4_EVAL_DOCS, data_dir, description)
        description["eval_documents"] = len(docs)
        return " ".join(docs)

    def calib_text() -> str:
        validation_only = find_c4_file(C4_TRAIN, data_dir) is None and find_c4_file(C4_VALIDATION, data_dir) is not None
        if validation_only:
            log.warning(
                "c4: no local %s; calibrating on validation documents %d.. (disjoint from the perplexity ones)",
                C4_TRAIN,
                C4_EVAL_DOCS,
            )
            docs = _c4_documents(C4_VALIDATION, "validation", C4_EVAL_DOCS, C4_CALIB_DOCS, data_dir, description)
            last = C4_EVAL_DOCS + len(docs) - 1
            description["calib"] = f"validation documents {C4_EVAL_DOCS}..{last}"
        else:
            docs = _c4_documents(C4_TRAIN, "train", 0, C4_CALIB_DOCS, data_dir, description)
            description["calib"] = f"train documents 0..{len(docs) - 1}"
        return "\n\n".join(docs)

    return TextSplit(calib_text, eval_text, description)


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
            f"the evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}: use a smaller --seqlen"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].reshape(count, seqlen)
