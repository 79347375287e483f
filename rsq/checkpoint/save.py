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
from pathlib import Path

import torch
from safetensors.torch import save_file

import rsq
from rsq.checkpoint.schema import FORMAT_VERSION, QUANT_METHOD, quantized_module_tensors
from rsq.config import TORCH_DTYPES, RSQConfig

MAX_SHARD = "2GB"


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
        "rsq_version": rsq.__version__,
        "rsq_config": cfg.to_dict(),
    }


def checkpoint_state_dict(
    model: torch.nn.Module, results: dict, cfg: RSQConfig, dtype: torch.dtype, rest_dtype: torch.dtype | None = None
) -> dict:
    """Packed tensors for quantized linears, plain tensors for the rest (names as in HF).

    ``rest_dtype``: cast the rest's floating tensors to it (scales and biases of quantized linears
    keep ``dtype``, so the quantized weights stay exactly those of the in-memory model)."""
    quantized = set(results)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized:
            continue
        if tensor.data_ptr() in seen:
            continue  # a tied weight (lm_head = embedding): stored once, re-tied on load
        seen.add(tensor.data_ptr())
        if rest_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(rest_dtype)
        out[name] = tensor.detach().contiguous()
    for full, res in results.items():
        bias = model.get_submodule(full).bias
        for key, t in quantized_module_tensors(res, cfg.grid, bias, dtype).items():
            out[f"{full}.{key}"] = t.contiguous()
    return out


def save_checkpoint(model, tokenizer, out: Path, cfg: RSQConfig, state, rotation_record) -> dict:
    """Write the checkpoint into ``out`` (a fresh directory). Returns {file: bytes}."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from rsq.hf import finish_config_dict, source_dtype

    out = Path(out)
    dtype = next(model.parameters()).dtype
    if cfg.save_dtype == "auto":  # the source's own 16-bit dtype (GGUF: float16) for a float32 run
        rest = source_dtype(cfg.model or None) if dtype == torch.float32 else None
    else:
        rest = TORCH_DTYPES[cfg.save_dtype]
    tensors = checkpoint_state_dict(model, state.results, cfg, dtype, rest)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=MAX_SHARD)
    sizes = {}
    for filename, names in split.filename_to_tensors.items():
        tmp = out / (filename + ".tmp")
        save_file({n: tensors[n] for n in names}, str(tmp), metadata={"format": "pt", "producer": "rsq"})
        os.replace(tmp, out / filename)
        sizes[filename] = (out / filename).stat().st_size
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": split.tensor_to_filename}
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
