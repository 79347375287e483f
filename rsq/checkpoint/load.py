"""Load an rsq checkpoint directory into a model with quantized linears and online rotations,
from its files alone (no rotation code path runs on full weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from rsq.checkpoint.dense import dequantize_once
from rsq.checkpoint.schema import FORMAT_VERSION, GUARD, GUARD_KEY, QUANT_METHOD
from rsq.config import TORCH_DTYPES, GridConfig
from rsq.errors import CheckpointFormatError, ConfigError
from rsq.models.adapter import ModelAdapter
from rsq.models.registry import resolve
from rsq.rotation.online import OnlineRotation, attach_online_rotation


def read_quant_config(path: Path) -> tuple[dict, dict]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointFormatError(f"{cfg_file} is missing: {path} is not an rsq checkpoint directory")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointFormatError(f"{cfg_file} is not valid JSON ({exc}): the checkpoint is corrupt") from exc
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointFormatError(f"{cfg_file} has no rsq quantization_config: not an rsq checkpoint")
    check_format_version(qc, cfg_file)
    if config.get(GUARD_KEY) == GUARD:  # the on-disk guard against plain transformers (rsq/io/hf.py), not
        del config[GUARD_KEY]  # part of the model config that readers (rsq export) carry on
    return config, qc


def check_format_version(qc: dict, where) -> None:
    if qc.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{where}: format_version {qc['format_version']} is newer than this rsq reads "
            f"({FORMAT_VERSION}): upgrade rsq"
        )
    kind, bits = qc.get("grid", "uniform"), qc.get("bits")
    try:
        GridConfig(kind=kind, bits=bits, group_size=qc.get("group_size", -1))  # asks the format registry
    except (ConfigError, TypeError) as exc:
        raise CheckpointFormatError(
            f"{where}: quantization_config says {bits!r} bits on the {kind} grid, which rsq checkpoints cannot "
            f"hold ({exc}): the file is corrupt or not from rsq; re-run rsq quantize"
        ) from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointFormatError(f"{index} is corrupt ({exc})") from exc
        files = [path / n for n in names]
    else:
        files = [path / "model.safetensors"]
    for f in files:
        if not f.is_file():
            raise CheckpointFormatError(f"{f} is missing: the checkpoint is incomplete; re-run rsq quantize")
    return files


def read_checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint directory ``path`` (all shards), on the CPU: what the exporters read."""
    return _read_tensors(_weight_files(Path(path)))


def _read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except Exception as exc:  # safetensors raises its own error type for truncated/corrupt files
            raise CheckpointFormatError(f"{f} is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    return tensors


def _quant_module(qc: dict, prefix: str, tensors: dict, linear: torch.nn.Linear, dtype: torch.dtype):
    """A skeleton module of the checkpoint's number format, to be filled from its stored tensors."""
    kind = qc.get("grid", "uniform")
    try:
        fmt = GridConfig(kind=kind, bits=qc["bits"], group_size=qc["group_size"]).format
    except ConfigError as exc:
        raise CheckpointFormatError(
            f"{prefix}: the checkpoint's quantization_config cannot be loaded ({exc}); it was written by another "
            "rsq version or edited by hand: re-quantize with this rsq"
        ) from None
    bias = tensors.get(f"{prefix}.bias")
    return fmt.empty_module(
        linear.in_features, linear.out_features, qc["bits"], qc["group_size"], bias is not None, dtype
    )


def replace_quantized_modules(model: torch.nn.Module, qc: dict, tensors: dict, dtype: torch.dtype) -> None:
    """Swap every linear named in ``qc["modules"]`` for an empty quantized module of the checkpoint's
    grid (``tensors`` tells which have a bias: ``P.bias`` present)."""
    for full in qc["modules"]:
        parent_name, child = full.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _quant_module(qc, full, tensors, getattr(parent, child), dtype))


def attach_online_rotations(model: torch.nn.Module, qc: dict, adapter: ModelAdapter) -> None:
    """Attach the checkpoint's recorded online rotations to every decoder layer (``adapter``: the
    model family's, from the caller that looked it up)."""
    layers = adapter.get_layers(model)
    rotation = qc.get("rotation") or {}
    for site in rotation.get("online", []):
        if site["kind"] in ("skipped", "per_head"):
            continue
        spec = OnlineRotation(site["module"], site["kind"], site["size"], site.get("head_dim", 1), site.get("seed", 0))
        for layer in layers:
            attach_online_rotation(layer.get_submodule(spec.module), spec)


def load_quantized(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, packed: bool = False
):
    """(model, tokenizer) from an rsq checkpoint directory. Raises CheckpointFormatError naming the
    file and the problem for missing, corrupt, truncated or mismatched files.

    ``packed=False`` (default): off the GPU kernels (CPU, or no Triton) the quantized linears compute
    with W_hat dequantized once (rsq/checkpoint/dense.py); ``packed=True`` keeps the packed reference
    path on every call."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    config_dict, qc = read_quant_config(path)
    dtype = dtype or TORCH_DTYPES.get(str(config_dict.get("dtype", "float32")), torch.float32)
    files = _weight_files(path)
    tensors = _read_tensors(files)

    config = AutoConfig.from_pretrained(str(path))
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # ours, not a transformers quantizer
    adapter = resolve(config)  # the public API starts from a directory: its family looked up once, here
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replace_quantized_modules(model, qc, tensors, dtype)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = set(model.state_dict().keys())
    if tied:
        expected.discard(f"{adapter.lm_head}.weight")
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointFormatError(
            f"{path}: tensors do not match the model config (missing: {missing[:5]}, unexpected: {unexpected[:5]}); "
            "the checkpoint is corrupt or from another model"
        )
    # a checkpoint saved with --save-dtype holds its unquantized tensors in another dtype
    # (each to its module's dtype: E8P scales stay float32, as from_pretrained keeps them)
    want = {k: v.dtype for k, v in model.state_dict().items()}
    tensors = {
        k: v.to(want.get(k, dtype)) if v.is_floating_point() and v.dtype != want.get(k, dtype) else v
        for k, v in tensors.items()
    }
    try:
        model.load_state_dict(tensors, strict=not tied, assign=True)
    except RuntimeError as exc:
        raise CheckpointFormatError(
            f"{path}: tensor shapes do not match the config ({str(exc).splitlines()[0]})"
        ) from exc

    if tied:
        model.get_submodule(adapter.lm_head).weight = model.get_submodule(adapter.embed).weight
    attach_online_rotations(model, qc, adapter)
    if not packed:
        dequantize_once(model, keep_packed=True)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer
