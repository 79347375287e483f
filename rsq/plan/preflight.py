"""Checks that run before a job's first expensive step, so that bad input fails in one line with
nothing created, instead of after the work (or with a traceback).

Each check raises an :class:`rsq.errors.RSQError` naming the problem and a value that fixes it.
What is checked: lengths and counts, the device name, the output location, the model's config
against the options (group size against every linear width, window lengths against the context),
that every text source is readable UTF-8, and the predicted peak host memory against what is
available (rsq.plan.memory.host_memory_plan).
"""

from __future__ import annotations

import math
import os
import tempfile
from functools import reduce
from pathlib import Path

from rsq.calib.datasets import load_text
from rsq.errors import ConfigError
from rsq.models.adapter import ModelAdapter
from rsq.models.registry import resolve
from rsq.rotation.pad import padded_config

FORCE_FLAG = "--force-seqlen"


def check_lengths(
    *,
    ppl_seqlen: int | None = None,
    ppl_max_windows: int | None = None,
    ppl_batch_size=None,
    seqlen_flag: str = "--ppl-seqlen",
) -> None:
    """Evaluation window length (>= 2: a window of one token predicts nothing), window count
    (None = all, else >= 1) and evaluation batch (None = automatic, else >= 1)."""
    if ppl_seqlen is not None and ppl_seqlen < 2:
        raise ConfigError(f"{seqlen_flag} {ppl_seqlen} is too short: a window needs at least 2 tokens (e.g. 512)")
    if ppl_max_windows is not None and ppl_max_windows < 1:
        raise ConfigError(f"--max-windows {ppl_max_windows} is invalid: use a positive count, or 0 for all windows")
    if ppl_batch_size is not None and ppl_batch_size < 1:
        raise ConfigError(f"--ppl-batch-size {ppl_batch_size} is invalid: use a positive count (e.g. 1)")


def check_nproc(nproc: int) -> None:
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} is invalid: use 1 or more ranks")


def check_output_location(out: Path, flag: str = "--out", kind: str = "directory") -> None:
    """``out`` can be created (as a directory, or a file for ``kind="file"``): not below a file, in
    a writable place. Probes by creating and removing a temporary directory in the nearest existing
    ancestor."""
    out = Path(out)
    if kind == "directory" and out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} is an existing file, not a directory: choose another {flag}")
    ancestor = out.parent.absolute()
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{flag} {out} lies below {ancestor}, which is a file: choose an {flag} inside a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rsq-write-probe-", dir=ancestor))
    except OSError as exc:
        raise ConfigError(
            f"{flag} {out}: cannot create directories in {ancestor} ({exc.strerror or type(exc).__name__}): "
            f"choose a writable {flag}"
        ) from exc


def check_file_target(path: Path, flag: str) -> None:
    """A file can be written at ``path``: not a directory, its directory creatable and writable."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory: pass a file name (e.g. {path / 'results.json'})")
    check_output_location(path, flag=flag, kind="file")


def suggest_group_size(widths: list[int], wanted: int) -> int:
    """A group size dividing every width: the power of two nearest ``wanted`` (at most 128) that
    divides their gcd, else the gcd itself, else -1."""
    g = reduce(math.gcd, widths)
    powers = [p for p in (8, 16, 32, 64, 128) if g % p == 0]
    if powers:
        return min(powers, key=lambda p: (abs(math.log2(p) - math.log2(max(wanted, 1))), -p))
    return g if g > 1 else -1


def check_group_size(group_size: int, widths: dict[str, int]) -> None:
    """ConfigError listing every width ``group_size`` does not divide, and a size that divides all."""
    if group_size <= 0:
        return
    bad: dict[int, list[str]] = {}
    for name, width in widths.items():
        if width % group_size:
            bad.setdefault(width, []).append(name)
    if not bad:
        return
    listed = "; ".join(f"{w} ({', '.join(names)})" for w, names in sorted(bad.items()))
    fix = suggest_group_size(list(widths.values()), group_size)
    advice = f"--group-size {fix}" if fix > 0 else "-1"
    raise ConfigError(
        f"--group-size {group_size} does not divide the input widths {listed}: use {advice}, which divides every "
        f"width of this model ({', '.join(map(str, sorted(set(widths.values()))))}), or -1 (per channel)"
    )


def context_length(config) -> int | None:
    n = getattr(config, "max_position_embeddings", None)
    return int(n) if isinstance(n, int) and n > 0 else None


def check_context(config, lengths: dict[str, int], force: bool) -> None:
    """Each (flag -> tokens) within the model's max_position_embeddings unless ``force``."""
    limit = context_length(config)
    if force or limit is None:
        return
    for flag, n in lengths.items():
        if n > limit:
            raise ConfigError(
                f"{flag} {n} exceeds the model's context of {limit} tokens (max_position_embeddings): use {flag} "
                f"{min(limit, 512)} (at most {limit}), or pass {FORCE_FLAG} to run beyond it anyway"
            )


def check_model(config, cfg, *, ppl_seqlen: int | None, force_seqlen: bool = False) -> ModelAdapter:
    """The options against the model's config (before any weight is read); returns the model
    family's adapter (UnsupportedModelError for a family rsq does not know), looked up here once."""
    adapter = resolve(config)  # the job's one lookup: rsq.job passes this adapter along
    # --pad-mlp: a width below the MLP's fails here; down_proj is quantized at the padded width
    padded = padded_config(config, cfg.rotation)
    if cfg.quantizes and cfg.grid.kind != "e8p":
        widths = {name: shape[1] for name, shape in adapter.linear_shapes(padded).items()}
        check_group_size(cfg.grid.group_size, widths)
    lengths = {}
    if cfg.quantizes:
        lengths["--seqlen"] = cfg.calib.seqlen
    if ppl_seqlen is not None:
        lengths["--ppl-seqlen"] = ppl_seqlen
    check_context(config, lengths, force_seqlen)
    return adapter


def load_sources(cfg, ppl_sources, calib: bool = True) -> dict:
    """Every text source of the job, read (and UTF-8 checked) now: {source: TextSplit}. c4 shards
    are read lazily on first use (their readers raise ConfigError naming the shard). ``calib``
    False: the calibration comes as tokens (rsq.quantize(calibration=...)), not from a source."""
    texts = {cfg.calib.source: load_text(cfg.calib.source, cfg.calib.data_dir)} if calib else {}
    for source in ppl_sources:
        if source not in texts:
            texts[source] = load_text(source, cfg.calib.data_dir)
    return texts
