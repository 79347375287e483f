"""The run store: everything a job keeps on disk, in one place.

The output is built in ``<out>.partial/`` next to ``<out>`` and renamed into place only when
complete. After every finished layer the partial directory holds that layer's quantized tensors
(``layer-NNNN.safetensors``) and ``state.json``; a streamed run also holds the layer's checkpoint
shard. ``resume=True`` reloads them: the finished layers go through the same layer loop as the
others (rsq.job.loop), their quantize stage replaced by :class:`rsq.job.stages.RestoreFinished`, so
the result is the same as an uninterrupted run's.

Only the main rank writes (``writer=False`` on the other ranks of a distributed run).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from rsq import jsonsafe
from rsq.checkpoint.save import layer_shard_name, write_layer_shard
from rsq.config import RSQConfig
from rsq.errors import CheckpointFormatError, ConfigError
from rsq.job.state import LayerReport, RunState, timed
from rsq.models.adapter import ModelAdapter
from rsq.plan.preflight import check_output_location
from rsq.solver.result import QuantResult

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


def partial_dir(out: Path) -> Path:
    return out.parent / f"{out.name}.partial"


def check_output(out: Path, cfg: RSQConfig, resume: bool, overwrite: bool) -> dict | None:
    """Check the destination without touching it; return the state to resume from (if any).

    A resumable ``<out>.partial/`` (one with state.json) is never discarded silently: without
    --resume or --overwrite the run stops and says so; with --resume its options must match."""
    check_output_location(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"output directory {out} already exists: pass --overwrite or choose another --out")
    part = partial_dir(out)
    state_file = part / STATE_FILE
    if not state_file.is_file():
        if resume:
            log.warning("--resume: no unfinished run in %s, starting from the beginning", part)
        return None
    if not resume and overwrite:
        return None  # --overwrite discards it
    saved = _read_state(state_file, part, resume)
    if not resume:
        raise ConfigError(
            f"{part} holds an unfinished run ({saved['finished_layers']} finished layers): pass --resume to "
            "continue it, or --overwrite to discard it and start over"
        )
    if saved["config"] != cfg.to_dict():
        raise ConfigError(
            f"--resume: the unfinished run in {part} used different options; rerun with the same options, "
            "or with --overwrite instead of --resume to start over"
        )
    return saved


def _read_state(state_file: Path, part: Path, resume: bool) -> dict:
    try:
        saved = json.loads(state_file.read_text())
        saved["finished_layers"], saved["config"] = int(saved["finished_layers"]), saved["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if not resume:
            raise ConfigError(
                f"{part} holds an unfinished run whose {STATE_FILE} is unreadable ({exc}): pass --overwrite to "
                "discard it and start over"
            ) from exc
        raise CheckpointFormatError(f"{state_file} is corrupt ({exc}): delete {part} and rerun") from exc
    return saved


def can_resume(out: Path, cfg: RSQConfig) -> bool:
    """Whether ``out`` has an unfinished run of exactly ``cfg`` that ``resume=True`` would continue."""
    state = partial_dir(out) / STATE_FILE
    try:
        return json.loads(state.read_text())["config"] == cfg.resolved().to_dict()
    except (OSError, ValueError, KeyError, TypeError):
        return False


@dataclass
class Session:
    """This session's share of the run (a resumed run has several sessions)."""

    started_after_layers: int
    earlier: list[dict] = field(default_factory=list)
    layers_quantized: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    t_start: float = 0.0
    t_quant: float = 0.0

    def clock(self, t_start: float) -> None:
        """The job started at ``t_start``; its layers start now."""
        self.t_start, self.t_quant = t_start, time.perf_counter()

    def layer_done(self, index: int) -> None:
        self.layers_quantized.append(index)
        now = time.perf_counter()
        self.timings["quantize"] = now - self.t_quant
        self.timings["total"] = now - self.t_start

    def record(self) -> dict:
        return {
            "started_after_layers": self.started_after_layers,
            "layers_quantized": self.layers_quantized,
            "timings": self.timings,
        }

    def all(self) -> list[dict]:
        return self.earlier + [self.record()]


class _Interrupted(Exception):
    """Raised by the testing aid ``stop_after_layer`` to simulate a killed run."""


class RunStore:
    """Owns ``<out>.partial/``: resume state, the finished layers' files, checkpoint shards of a
    streamed run, and the final rename into ``<out>``.

    ``saved``: the state of the unfinished run to continue (check_output), or None.
    ``streamed``: each finished layer's checkpoint shard is written as it finishes and its codes
    are dropped from memory (they are on disk); otherwise the codes stay for the final save.
    ``stop_after``: testing aid, raise :class:`_Interrupted` once that layer is saved.
    ``background``: finished layers' files are written on a writer thread (:meth:`finish`)."""

    def __init__(self, out: Path, cfg: RSQConfig, saved: dict | None, *, writer: bool = True, background: bool = True):
        self.out, self.cfg, self.saved, self.writer = Path(out), cfg, saved, writer
        self.part = partial_dir(self.out)
        self.start = 0 if saved is None else int(saved["finished_layers"])
        self.session = Session(self.start, list(saved.get("sessions", [])) if saved is not None else [])
        self.streamed = False
        self.stop_after: int | None = None
        self.adapter: ModelAdapter | None = None
        self.layers: list[nn.Module] = []
        # the writer thread of the finished layers' files, and the write in flight (layer, future)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rsq-write") if writer and background else None
        self._pending: tuple[int, Future] | None = None

    def create(self) -> None:
        """The partial directory: kept when resuming, else made fresh (whatever was there goes)."""
        if self.saved is not None or not self.writer:
            return
        if self.part.is_dir():
            shutil.rmtree(self.part)
        elif self.part.exists():
            self.part.unlink()
        self.part.mkdir(parents=True)

    def discard_unresumable(self) -> None:
        """After a failure: nothing resumable means no half-written output is left."""
        if self.writer and not (self.part / STATE_FILE).exists():
            shutil.rmtree(self.part, ignore_errors=True)

    def attach(self, adapter: ModelAdapter, layers: list[nn.Module], streamed: bool) -> None:
        self.adapter, self.layers, self.streamed = adapter, list(layers), streamed

    # -- resume -------------------------------------------------------------------------------
    def load_state(self) -> RunState:
        """The finished layers' reports and the metadata of their results; their codes are read
        at each layer's turn (:meth:`restore_results`), or now for an in-memory run."""
        state = RunState()
        if self.saved is None:
            return state
        state.timings = dict(self.saved.get("timings", {}))
        state.layers = [LayerReport(**rec) for rec in self.saved["layers"]]
        if not self.streamed:
            for index in range(self.start):
                self.restore_results(index, state)
        log.info("resuming after %d finished layers", self.start)
        return state

    def restore_results(self, index: int, state: RunState) -> None:
        """Layer ``index``'s saved codes and scales into ``state.results`` (and its importance map)."""
        if self._has_codes(index, state):
            return
        tensors = self._read_layer_file(index)
        if "importance" in tensors:
            state.importance_maps[index] = tensors["importance"]
        for full in self._names(index):
            if full not in self.saved["results_meta"]:  # kept unquantized (--unrotated-outliers keep-float)
                continue
            meta = self.saved["results_meta"][full]
            state.results[full] = QuantResult(
                codes=tensors[f"{full}.codes"],
                scale=tensors[f"{full}.scale"],
                zero=tensors[f"{full}.zero"],
                weight=None,
                loss=meta["loss"],
                damp=meta["damp"],
                meta=meta["meta"],
            )

    def _has_codes(self, index: int, state: RunState) -> bool:
        res = state.results.get(next(iter(self._names(index))))
        return res is not None and res.codes is not None

    def _names(self, index: int) -> list[str]:
        return [f"{self.adapter.layers}.{index}.{name}" for name in self.adapter.linears]

    def _read_layer_file(self, index: int, only: str | None = None) -> dict[str, torch.Tensor]:
        path = self.part / f"layer-{index:04d}.safetensors"
        try:
            if only is None:
                return load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                return {only: handle.get_tensor(only)} if only in handle.keys() else {}
        except Exception as exc:  # safetensors raises several types for truncated files
            raise CheckpointFormatError(f"{path} is unreadable ({exc}): delete {self.part} and rerun") from exc

    # -- per layer ------------------------------------------------------------------------------
    def finish(self, index: int, state: RunState) -> None:
        """Layer ``index`` was quantized in this session: its shard (streamed), its files and
        state.json (so a killed run resumes after it), written in that order. With ``background``
        they are written on the writer thread while the loop goes on to the next layer: what they
        hold is taken now, at most one layer is in flight, and a write's error is raised here at
        the next layer or by :meth:`drain`. state.json is written last, so it never claims a layer
        whose files are not on disk."""
        self.session.layer_done(index)
        if self.writer:
            self.drain(state)  # the previous layer's files are on disk (or its error is raised)
            write = self._layer_writer(index, state)
            if self._pool is None:
                self._guarded(write)
            else:
                self._pending = (index, self._pool.submit(self._guarded, write))
        if self.stop_after is not None and index >= self.stop_after:
            self.drain(state)
            raise _Interrupted(index)

    def drain(self, state: RunState | None = None) -> None:
        """Wait until the finished layers' files are on disk; a background write's error is raised
        here. The wait is billed to ``state.timings["io_wait_write"]``."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        with timed(state or RunState(), "io_wait_write"):
            pending[1].result()

    def close(self) -> None:
        """After the loop, also after a failure: nothing is left writing into the partial directory
        (a failure's cleanup may remove it). An error of a write nobody waited for is logged."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending[1].result()
            except Exception as exc:  # the run is already failing: its own error is the one raised
                log.error("writing layer %d's files failed too: %s", pending[0], exc)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _guarded(self, write) -> None:
        """A background write; on failure its temporary files go (a resumed run never sees them)."""
        try:
            write()
        except BaseException:
            for tmp in self.part.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
            raise

    def release(self, index: int, state: RunState) -> None:
        """A streamed run is done with layer ``index``: a layer finished by an earlier in-memory
        session gets its shard now (from the same codes and the same rotated layer, so bit-identical
        to writing it when it finished), then the codes leave memory (they are on disk, or held by
        the writer until they are)."""
        if not self.streamed:
            return
        if index < self.start and self.writer and not (self.part / self._shard_name(index)).is_file():
            self._write_shard(index, state.results, self.layers[index])
        for full in self._names(index):
            res = state.results.get(full)
            if res is not None:
                res.codes = res.scale = res.zero = res.weight = res.row_loss = None

    def _shard_name(self, index: int) -> str:
        return layer_shard_name(index, len(self.layers))

    def _write_shard(self, index: int, results: dict, layer, dtype: torch.dtype | None = None) -> None:
        n = len(self.layers)
        write_layer_shard(layer, index, self.adapter.layers, n, results, self.cfg, self.part, dtype)

    def _layer_writer(self, index: int, state: RunState):
        """A function writing layer ``index``'s files from what they hold now: the layer's tensors
        (a streamed run releases the layer before the write ends), its results (shallow copies: the
        codes are dropped from ``state`` at release) and state.json's text."""
        prefix = f"{self.adapter.layers}.{index}."
        results = {k: replace(r) for k, r in state.results.items() if k.startswith(prefix)}
        importance = state.importance_maps.get(index)
        record = jsonsafe.dumps(self._record(index, state))
        shard = None
        if self.streamed:  # the state dict's tensors outlive the layer's release to meta
            layer = self.layers[index]
            dense = {f"{k[len(prefix) :]}.weight" for k in results}  # W_hat: the shard holds the codes
            tensors = {k: t for k, t in layer.state_dict().items() if k not in dense}
            shard = (tensors, next(layer.parameters()).dtype)

        def write() -> None:
            if shard is not None:  # the checkpoint's shard first: state.json then says it is there
                self._write_shard(index, results, *shard)
            self._save_layer(index, results, importance, record)

        return write

    def _record(self, index: int, state: RunState) -> dict:
        return {
            "config": self.cfg.to_dict(),
            "finished_layers": index + 1,
            "layers": [vars(r) for r in state.layers],
            "results_meta": {k: {"loss": r.loss, "damp": r.damp, "meta": r.meta} for k, r in state.results.items()},
            "timings": state.timings,
            "sessions": self.session.all(),
            "streamed": self.streamed,  # a streamed run's checkpoint shards are in the directory too
        }

    def _save_layer(self, index: int, results: dict, importance: torch.Tensor | None, record: str) -> None:
        tensors = {}
        for name, res in results.items():
            tensors[f"{name}.codes"] = res.codes.contiguous()
            tensors[f"{name}.scale"] = res.scale.contiguous()
            tensors[f"{name}.zero"] = res.zero.contiguous()
        if importance is not None:  # kept so a resumed run's importance.safetensors is complete
            tensors["importance"] = importance.contiguous()
        tmp = self.part / f"layer-{index:04d}.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.part / f"layer-{index:04d}.safetensors")
        tmp = self.part / (STATE_FILE + ".tmp")
        tmp.write_text(record)
        os.replace(tmp, self.part / STATE_FILE)

    # -- the end --------------------------------------------------------------------------------
    def drop_stale_shards(self) -> None:
        """An in-memory session writes the whole checkpoint: shards of an earlier streamed session go."""
        if not self.streamed:
            for stale in self.part.glob("model-*-of-*.safetensors"):
                stale.unlink()

    def finalize(self, results: dict, importance_maps: dict[int, torch.Tensor]) -> None:
        """importance.safetensors and results.json, the resume files removed, and the rename."""
        if importance_maps:
            save_file(
                {f"layer.{i}": w.contiguous() for i, w in importance_maps.items()},
                str(self.part / "importance.safetensors"),
            )
        (self.part / "results.json").write_text(jsonsafe.dumps(results, indent=2))
        for leftover in list(self.part.glob("layer-*.safetensors")) + [self.part / STATE_FILE]:
            leftover.unlink(missing_ok=True)
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.part, self.out)
