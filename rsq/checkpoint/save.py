"""Write a packed rsq checkpoint: safetensors shards + config.json + tokenizer.

Layout (format_version 1; rsq/checkpoint/schema.py is the contract):

* every quantized linear ``P`` is stored as ``P.qweight`` (int32, codes packed densely along the
  input dim, rsq/quant/pack.py), ``P.scales`` (out, n_groups, model dtype), ``P.qzeros`` (uint8,
  out × n_groups) and ``P.bias`` when it has one; e8p linears store ``P.codes`` (int16 bit pattern
  of the 16-bit codeword index, out × in/8) and ``P.scales`` (1 × 1);
* every other tensor (embeddings, norms, lm_head) under its usual Hugging Face name;
* ``config.json``'s ``quantization_config`` records the method, grid, solver, the rotation with its
  seed and every online-rotation site, the full RSQConfig, and the rsq version, so that
  :func:`rsq.checkpoint.load.load_quantized` rebuilds the model from the directory alone.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from rsq.checkpoint.schema import FORMAT_VERSION, QUANT_METHOD, quantized_module_tensors
from rsq.config import TORCH_DTYPES, RSQConfig
from rsq.io.hf import finish_config_dict, source_dtype
from rsq.models.adapter import ModelAdapter
from rsq.models.registry import resolve
from rsq.version import __version__

MAX_SHARD = "2GB"
MERGE_BELOW = 2 * 10**9  # a streamed run's shards are joined into one model.safetensors below this size
SHARD_METADATA = {"format": "pt", "producer": "rsq"}


def quantization_config(cfg: RSQConfig, rotation_record: dict | None, modules: list[str]) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "method": cfg.method,
        "grid": cfg.grid.kind,
        "bits": cfg.grid.bits,
        "group_size": cfg.grid.group_size,
        "symmetric": cfg.grid.symmetric,
        "act_order": cfg.solver.act_order,
        "pack": "dense-little-endian-32",
        "modules": modules,
        "rotation": rotation_record,
        "seed": cfg.seed,
        "rsq_version": __version__,
        "rsq_config": cfg.to_dict(),
    }


def checkpoint_state_dict(
    model: torch.nn.Module | Mapping[str, torch.Tensor],
    results: dict,
    cfg: RSQConfig,
    dtype: torch.dtype,
    rest_dtype: torch.dtype | None = None,
    prefix: str = "",
    skip: str | None = None,
) -> dict:
    """Packed tensors for quantized linears, plain tensors for the rest (names as in HF).

    ``rest_dtype``: cast the rest's floating tensors to it (scales and biases of quantized linears
    keep ``dtype``, so the quantized weights stay exactly those of the in-memory model).
    ``model`` may be one decoder layer whose names start with ``prefix`` in the whole model (a
    streamed run writes each layer as it finishes); ``skip``: a name prefix left out (the decoder
    layers, when only the model's ends are written). Tensors on ``meta`` are never written.
    ``model`` may also be its state dict (a finished layer's tensors, written on a background thread
    after the layer itself was released)."""
    dot = f"{prefix}." if prefix else ""
    quantized = {k for k in results if k.startswith(dot)}
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    state = model if isinstance(model, Mapping) else model.state_dict()
    for rel, tensor in state.items():
        name = dot + rel
        module = name.rsplit(".", 1)[0]
        if module in quantized or tensor.device.type == "meta" or (skip and name.startswith(skip)):
            continue
        if tensor.data_ptr() in seen:
            continue  # a tied weight (lm_head = embedding): stored once, re-tied on load
        seen.add(tensor.data_ptr())
        if rest_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(rest_dtype)
        out[name] = tensor.detach().contiguous()
    for full in sorted(k for k in quantized if not (skip and k.startswith(skip))):
        bias = state.get(f"{full[len(dot) :]}.bias")  # the module's bias parameter, if it has one
        for key, t in quantized_module_tensors(results[full], cfg.grid, bias, dtype).items():
            out[f"{full}.{key}"] = t.contiguous()
    return out


def rest_dtype_of(cfg: RSQConfig, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype of a checkpoint's unquantized tensors (None: the run's ``dtype``)."""
    if cfg.save_dtype == "auto":  # the source's own 16-bit dtype (GGUF: float16) for a float32 run
        return source_dtype(cfg.model or None) if dtype == torch.float32 else None
    return TORCH_DTYPES[cfg.save_dtype]


def layer_shard_name(index: int, n_layers: int) -> str:
    """Decoder layer ``index``'s shard of a streamed run; index ``n_layers``: the model's ends."""
    return f"model-{index + 1:05d}-of-{n_layers + 1:05d}.safetensors"


def write_layer_shard(
    layer: torch.nn.Module | Mapping[str, torch.Tensor],
    index: int,
    prefix: str,
    n_layers: int,
    results: dict,
    cfg: RSQConfig,
    out: Path,
    dtype: torch.dtype | None = None,
) -> Path:
    """One finished decoder layer's checkpoint tensors, written atomically into ``out``. ``layer``:
    the layer or its state dict (then with ``dtype``, the run's: that of its parameters)."""
    dtype = dtype or next(layer.parameters()).dtype
    tensors = checkpoint_state_dict(layer, results, cfg, dtype, rest_dtype_of(cfg, dtype), prefix=f"{prefix}.{index}")
    target = out / layer_shard_name(index, n_layers)
    tmp = target.with_name(target.name + ".tmp")
    save_file(tensors, str(tmp), metadata=SHARD_METADATA)
    os.replace(tmp, target)
    return target


def save_checkpoint(
    model,
    tokenizer,
    out: Path,
    cfg: RSQConfig,
    state,
    rotation_record,
    streamed: int | None = None,
    adapter: ModelAdapter | None = None,
):
    """Write the checkpoint into ``out`` (a fresh directory). Returns {file: bytes}.

    ``streamed`` = the number of decoder layers when their shards are already in ``out``
    (:func:`write_layer_shard`): only the model's ends are written, then the index; a checkpoint
    under MERGE_BELOW bytes is joined into one ``model.safetensors``, the layout the in-memory path
    writes (the join holds at most MERGE_BELOW bytes of packed tensors, twice)."""
    from huggingface_hub import split_torch_state_dict_into_shards

    out = Path(out)
    dtype = next(model.parameters()).dtype
    rest = rest_dtype_of(cfg, dtype)
    if streamed is None:
        tensors = checkpoint_state_dict(model, state.results, cfg, dtype, rest)
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD)
        sizes = {}
        for filename, names in split.filename_to_tensors.items():
            tmp = out / (filename + ".tmp")
            save_file({n: tensors[n] for n in names}, str(tmp), metadata=SHARD_METADATA)
            os.replace(tmp, out / filename)
            sizes[filename] = (out / filename).stat().st_size
        weight_map = split.tensor_to_filename if split.is_sharded else None
    else:
        # the job passes its adapter; a caller with a bare model (bench scripts) has it looked up
        layers = (adapter or resolve(model.config)).layers + "."
        tensors = checkpoint_state_dict(model, state.results, cfg, dtype, rest, skip=layers)
        sizes, weight_map = _finish_streamed(out, tensors, streamed)
    if weight_map is not None:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(cfg, rotation_record, sorted(state.results))
    config["tie_word_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", False))
    config["dtype"] = str(dtype).replace("torch.", "")

    finish_config_dict(config, model)  # architectures, neutral _name_or_path, plain-transformers guard
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(out))
    return sizes


def _finish_streamed(out: Path, ends: dict, n_layers: int) -> tuple[dict, dict | None]:
    """Write the ends' shard beside the layers' shards; ({file: bytes}, weight_map or None)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    last = out / layer_shard_name(n_layers, n_layers)
    save_file(ends, str(last) + ".tmp", metadata=SHARD_METADATA)
    os.replace(str(last) + ".tmp", last)
    files = [out / layer_shard_name(i, n_layers) for i in range(n_layers + 1)]
    sizes = {f.name: f.stat().st_size for f in files}
    if sum(sizes.values()) < MERGE_BELOW:
        joined: dict[str, torch.Tensor] = {}
        for f in files:
            joined.update(load_file(str(f)))
        target = out / "model.safetensors"
        save_file(joined, str(target) + ".tmp", metadata=SHARD_METADATA)
        os.replace(str(target) + ".tmp", target)
        for f in files:
            f.unlink()
        return {target.name: target.stat().st_size}, None
    weight_map = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            weight_map.update({k: f.name for k in handle.keys()})
    return sizes, dict(sorted(weight_map.items()))
