"""Stream a model from its safetensors files: a skeleton on the ``meta`` device, tensors read
layer by layer just before the pipeline reaches the layer, released after it is finished.

Applies to a local Hugging Face directory of safetensors weights (``model.safetensors`` or shards
with ``model.safetensors.index.json``, as ``save_pretrained`` writes them; a downloaded hub
snapshot directory is one). GGUF files, hub ids (not resolved to a local snapshot here),
quantized sources (a ``quantization_config``) and ``.bin`` weights keep the in-memory path of
:func:`rsq.io.loading.load_model`.

Host memory held by a streamed model: the model's ends (embeddings, final norm, lm_head), which
stay resident for the calibration capture and the evaluation, plus the decoder layers between
:meth:`LayerStreamer.fetch` and :meth:`LayerStreamer.release` — one at a time in
rsq.job.loop.run_layers — and, with ``prefetch``, the next layer's tensors, read on a background
thread while the current layer is worked on (at most one layer ahead). Each read opens the layer's
files and closes them again, so the memory-mapped pages it touched leave the resident set with it.

Before the first layer, :meth:`StreamSource.check` reads only the files' headers (safe_open
metadata) and refuses missing, truncated or unreadable files, tensors the index lists but its shard
lacks, tensors the model needs but the files lack, and shapes that disagree with the config.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from rsq.errors import CheckpointFormatError
from rsq.models.adapter import ModelAdapter

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def streamable(model: str | None) -> Path | None:
    """The directory to stream ``model`` from, or None when it takes the in-memory path."""
    if not model or str(model).endswith(".gguf"):
        return None
    path = Path(model).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        return None
    if not ((path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file()):
        return None  # .bin weights, or no weights: transformers' loader (and its errors)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None  # let the in-memory loader report it
    if config.get("quantization_config"):
        return None  # rsq / compressed-tensors / other quantized sources need their loaders
    return path


def build_skeleton(config, dtype: torch.dtype) -> nn.Module:
    """The model of ``config`` with every parameter on ``meta`` (buffers, e.g. rotary inverse
    frequencies, are real: they are computed, not loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class StreamSource:
    """A checkpoint directory's tensor -> file map, checked against a skeleton model."""

    path: Path
    weight_map: dict[str, str]  # tensor name -> file name (relative to path)
    index_file: Path | None
    tied: bool
    expected: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @classmethod
    def open(cls, path: Path, model: nn.Module, adapter: ModelAdapter) -> "StreamSource":
        """Read the index (or the single file's header) and check it against ``model``'s shapes."""
        path = Path(path)
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointFormatError(
                    f"{index} is unreadable or has no weight_map ({type(exc).__name__}: {exc}): re-save the model "
                    "with save_pretrained or download it again"
                ) from None
            index_file = index
        else:
            names = _header(path / SINGLE_FILE)[0]
            weight_map, index_file = {n: SINGLE_FILE for n in names}, None
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if tied:
            expected.pop(f"{adapter.lm_head}.weight", None)
        source = cls(path, weight_map, index_file, tied, expected)
        source.check()
        return source

    def check(self) -> None:
        """Every file present and readable, every listed tensor in its file, every needed tensor
        listed, every shape as the config says: CheckpointFormatError naming the file otherwise."""
        listed_in = f" (listed in {self.index_file})" if self.index_file else ""
        for name in sorted(set(self.weight_map.values())):
            f = self.path / name
            if not f.is_file():
                raise CheckpointFormatError(
                    f"{f} is missing{listed_in}: the checkpoint is incomplete; download or copy it again"
                )
            keys, shapes = _header(f)
            wanted = [k for k, v in self.weight_map.items() if v == name]
            absent = [k for k in wanted if k not in keys]
            if absent:
                raise CheckpointFormatError(
                    f"{f} lacks {len(absent)} tensor(s) that {self.index_file.name if self.index_file else 'it'} "
                    f"lists, e.g. {absent[0]}: the shard and its index disagree; download the checkpoint again"
                )
            for k in wanted:
                want = self.expected.get(k)
                if want is not None and tuple(shapes[k]) != want:
                    raise CheckpointFormatError(
                        f"{f}: {k} has shape {tuple(shapes[k])} but the config says {want}: the weights are from "
                        "another model or config.json was edited; use the matching config.json"
                    )
        missing = sorted(set(self.expected) - set(self.weight_map))
        if missing:
            where = self.index_file or self.path / SINGLE_FILE
            raise CheckpointFormatError(
                f"{where} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}: the checkpoint is "
                "incomplete or from another architecture"
            )

    def read(self, names: list[str], dtype: torch.dtype, pin: bool = False) -> dict[str, torch.Tensor]:
        """The named tensors in ``dtype``; each file is opened for the call and closed after it.
        ``pin``: into pinned (page-locked) host memory, converted on the way where needed."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for fname, keys in by_file.items():
            f = self.path / fname
            try:
                with safe_open(str(f), framework="pt") as handle:
                    for k in keys:
                        t = handle.get_tensor(k)
                        want = dtype if t.is_floating_point() else t.dtype
                        if pin:  # one copy into page-locked memory, the dtype conversion on the way
                            out[k] = torch.empty(t.shape, dtype=want, pin_memory=True).copy_(t)
                        else:
                            out[k] = t if t.dtype == want else t.to(want)
            except Exception as exc:  # safetensors raises its own error types for damaged data
                raise CheckpointFormatError(f"{f} is unreadable ({type(exc).__name__}: {exc})") from exc
        return out


def _header(f: Path) -> tuple[list[str], dict[str, list[int]]]:
    """(tensor names, shapes) from a safetensors file's header alone."""
    if not f.is_file():
        raise CheckpointFormatError(f"{f} is missing: the checkpoint is incomplete; download or copy it again")
    try:
        with safe_open(str(f), framework="pt") as handle:
            keys = list(handle.keys())
            return keys, {k: list(handle.get_slice(k).get_shape()) for k in keys}
    except Exception as exc:  # truncated or not a safetensors file
        raise CheckpointFormatError(
            f"{f} is truncated or not a safetensors file ({type(exc).__name__}: {str(exc).splitlines()[0]}): "
            "download or copy it again"
        ) from None


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Put ``tensors`` (names relative to the model) into ``module`` (found at ``prefix``)."""
    for full, t in tensors.items():
        rel = full[len(prefix) + 1 :] if prefix else full
        owner_name, _, pname = rel.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if pname in owner._parameters:
            owner._parameters[pname] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[pname] = t


def materialized_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters that are not on the meta device."""
    return sum(p.numel() * p.element_size() for p in module.parameters() if p.device.type != "meta")


class LayerStreamer:
    """A weight source (rsq.job.weights.WeightSource) that fills decoder layer ``i`` of a skeleton
    model from the source just before its turn and empties it (back to meta) after it.

    ``prefetch``: while layer i is at its turn, a background thread reads layer i + 1's tensors
    (at most one layer ahead), so the loop waits on the disk only where the read is slower than a
    layer's work. ``pin``: the tensors are read into pinned host memory (a CUDA run: its copies to
    the device run at full speed and may be asynchronous). The tensors are the same either way:
    prefetching changes when a layer is read, never what is read."""

    streamed = True
    timing_key = "io_wait_read"  # the time the loop waits for a layer's tensors

    def __init__(
        self,
        source: StreamSource,
        model: nn.Module,
        adapter: ModelAdapter,
        dtype: torch.dtype,
        *,
        prefetch: bool = False,
        pin: bool = False,
    ):
        self.source, self.model, self.adapter, self.dtype = source, model, adapter, dtype
        self.pin = pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rsq-read") if prefetch else None
        self._ahead: tuple[int, Future] | None = None  # (layer index, its read in flight)
        self._n_layers = len(adapter.get_layers(model))

    def load_ends(self) -> None:
        """Materialize everything outside the decoder layers (embeddings, final norm, lm_head),
        tying the lm_head to the embedding when the config says so (as from_pretrained does)."""
        prefix = self.adapter.layers + "."
        names = [n for n in self.source.expected if not n.startswith(prefix)]
        _assign(self.model, self.source.read(names, self.dtype), "")
        if self.source.tied:
            self.model.get_submodule(self.adapter.lm_head).weight = self.model.get_submodule(self.adapter.embed).weight
        if self._pool is not None and self._n_layers:  # layer 0 is read during the calibration capture
            self._ahead = (0, self._pool.submit(self._read_layer, 0))

    def _read_layer(self, index: int) -> dict[str, torch.Tensor]:
        prefix = f"{self.adapter.layers}.{index}."
        names = [n for n in self.source.expected if n.startswith(prefix)]
        return self.source.read(names, self.dtype, pin=self.pin)

    def fetch(self, index: int, layer: nn.Module) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == index:
            tensors = ahead[1].result()  # the read's error, if any, is raised here
        else:
            if ahead is not None:  # not the layer asked for (not reached by the loop): let it finish
                ahead[1].cancel() or _quiet_result(ahead[1])
            tensors = self._read_layer(index)
        _assign(layer, tensors, f"{self.adapter.layers}.{index}")
        if self._pool is not None and index + 1 < self._n_layers:
            self._ahead = (index + 1, self._pool.submit(self._read_layer, index + 1))

    def release(self, index: int, layer: nn.Module) -> None:
        layer.to("meta")

    def close(self) -> None:
        """Wait for a read still in flight (its result is dropped) and stop the reader thread."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[1].cancel() or _quiet_result(ahead[1])
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _quiet_result(future: Future) -> None:
    """Wait for ``future``; its error is logged, not raised (a read nobody needs any more)."""
    try:
        future.result()
    except Exception as exc:  # the loop failed or stopped before it needed this layer
        log.debug("a prefetched layer read that was not needed failed: %s", exc)


def open_streamed(path: Path, config, adapter: ModelAdapter, dtype: torch.dtype) -> tuple[nn.Module, StreamSource]:
    """(skeleton model, checked source): nothing but the files' headers has been read. ``adapter``:
    the model family's (rsq.models.registry.resolve, called once by the job's preparation)."""
    model = build_skeleton(config, dtype)
    return model, StreamSource.open(path, model, adapter)


def load_tokenizer_and_generation(path: Path, model: nn.Module):
    """The directory's tokenizer, and its generation_config.json into ``model`` (as from_pretrained)."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    return tokenizer
