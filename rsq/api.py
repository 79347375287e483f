"""The Python API: ``rsq.quantize`` and ``rsq.load`` (re-exported by rsq/__init__.py)."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

import torch

from rsq.calib.datasets import tokenize
from rsq.config import TORCH_DTYPES, CalibConfig, RSQConfig
from rsq.errors import ConfigError
from rsq.io.hf import load_adopted
from rsq.io.loading import load_model
from rsq.recipe import SECTIONS, config_from_recipe, read_recipe

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    Calibration = Union[str, Sequence[str], torch.Tensor, Dataset]


# run_quantize's own keywords (rsq.job.run.JobOptions), accepted as they are (ppl_sources and
# preloaded as ppl / model+tokenizer)
_RUN_OPTIONS = (
    "resume",
    "overwrite",
    "ppl_sources",
    "preloaded",
    "ppl_seqlen",
    "ppl_max_windows",
    "progress",
    "stop_after_layer",
    "dist_ctx",
)


def _config(config: RSQConfig | str | os.PathLike | dict | None, overrides: dict[str, Any]) -> RSQConfig:
    if isinstance(config, RSQConfig):
        if not overrides:
            return config
        data = config.to_dict()
    elif config is None:
        data = {}
    elif isinstance(config, dict):
        data = dict(config)
    elif isinstance(config, (str, os.PathLike)):
        data = read_recipe(config)
    else:
        raise ConfigError(f"config must be an RSQConfig, a recipe dict or a .yaml/.json path, got {type(config)}")
    for key, value in overrides.items():  # keyword overrides: method="gptq", grid={"bits": 4}, seed=1
        if key in SECTIONS and isinstance(value, dict):
            data[key] = {**(data.get(key) or {}), **value}
        else:
            data[key] = value
    return config_from_recipe(data)


def _calibration_ids(calibration, tokenizer, text_column: str) -> tuple[torch.Tensor, str]:
    """(token ids, description) for texts, a datasets.Dataset or token tensors."""
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() not in (1, 2) or calibration.is_floating_point():
            raise ConfigError(
                f"calibration tensor must hold token ids, 1-D (a stream) or 2-D (windows), got "
                f"{calibration.dtype} of shape {tuple(calibration.shape)}"
            )
        return calibration.long().cpu(), "tokens"
    if hasattr(calibration, "column_names") and hasattr(calibration, "__getitem__"):  # a datasets.Dataset
        if text_column not in calibration.column_names:
            raise ConfigError(
                f"the calibration dataset has no {text_column!r} column (columns: {calibration.column_names}): "
                "pass text_column=..."
            )
        texts = [t for t in calibration[text_column] if t]
        kind = "dataset"
    elif isinstance(calibration, (list, tuple)) and all(isinstance(t, str) for t in calibration):
        texts, kind = [t for t in calibration if t], "texts"
    else:
        raise ConfigError(
            "calibration must be a source name or file (str), a list of texts, token ids (torch.Tensor) "
            f"or a datasets.Dataset with a {text_column!r} column; got {type(calibration).__name__}"
        )
    if tokenizer is None:
        raise ConfigError("calibration texts need a tokenizer: pass tokenizer=...")
    return tokenize(tokenizer, "\n\n".join(texts)), kind


def quantize(
    config: RSQConfig | str | os.PathLike | dict | None = None,
    out: str | os.PathLike | None = None,
    *,
    model: str | PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    calibration: Calibration | None = None,
    text_column: str = "text",
    ppl: Sequence[str] = (),
    **options: Any,
) -> Path:
    """Quantize a model and write an rsq checkpoint to ``out``; returns the output directory.

    * ``config``: an :class:`RSQConfig`, a recipe dict, or a YAML/JSON recipe file (the file
      ``rsq quantize --config`` reads); ``options`` override it field by field (``method="gptq"``,
      ``grid={"bits": 4}``, ``seed=1``, ...). None: the defaults (method rsq, 3 bits).
    * ``model``: a hub id, directory or .gguf path, or a loaded ``PreTrainedModel`` (with its
      ``tokenizer``); a loaded model is rotated and quantized in place (pass a copy to keep it).
    * ``calibration``: a source name or text file (as ``--calib``), a list of texts, a
      ``datasets.Dataset`` (``text_column``), or token ids: 1-D (sampled into the config's windows)
      or 2-D (N, T) windows used as they are.
    * ``ppl``: perplexity sources to evaluate before saving (results.json), none by default.
    * ``resume=True`` continues an interrupted run into ``out``; ``overwrite=True`` replaces an
      existing ``out`` (both off by default; rsq.job.run.JobOptions lists the other run options).
    """
    from rsq.job.run import run_quantize  # the job loads the kernels (torch._dynamo)

    passed = {k: options.pop(k) for k in list(options) if k in _RUN_OPTIONS}
    if "ppl_sources" in passed:
        ppl = passed.pop("ppl_sources")
    if "preloaded" in passed:
        model, tokenizer = passed.pop("preloaded")
    if out is None:
        raise ConfigError("rsq.quantize needs out=...: the directory to write the checkpoint into")
    preloaded = _preloaded(model, tokenizer, options)
    if isinstance(calibration, (str, os.PathLike)):
        options["calib"] = {**options.get("calib", {}), "source": str(calibration)}
        calibration = None
    cfg = _config(config, options)
    ids = None
    if calibration is not None:
        if preloaded is None:
            preloaded = load_model(cfg.model or None, TORCH_DTYPES[cfg.dtype])
        ids, kind = _calibration_ids(calibration, preloaded[1] if tokenizer is None else tokenizer, text_column)
        calib = replace(cfg.calib, source=kind)
        if ids.dim() == 2:
            calib = CalibConfig(source=kind, nsamples=ids.shape[0], seqlen=ids.shape[1], data_dir=cfg.calib.data_dir)
        cfg = replace(cfg, calib=calib)
    passed.setdefault("resume", False)
    passed.setdefault("overwrite", False)
    run_quantize(cfg, Path(out), ppl_sources=tuple(ppl), preloaded=preloaded, calibration=ids, **passed)
    return Path(out)


def _preloaded(model, tokenizer, options: dict) -> tuple | None:
    """(model, tokenizer) for a loaded model (its source recorded in ``options["model"]``), None
    for a name or path (recorded there too) or no model."""
    if model is None:
        return None
    if isinstance(model, (str, os.PathLike)):
        options["model"] = str(model)
        return None
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ConfigError(f"model must be a hub id, a path or a transformers PreTrainedModel, got {type(model)}")
    if tokenizer is None:
        raise ConfigError("a loaded model needs its tokenizer: rsq.quantize(model=model, tokenizer=tokenizer)")
    options["model"] = str(getattr(model.config, "_name_or_path", "") or "")
    qc = getattr(model.config, "quantization_config", None)
    gguf = getattr(qc, "gguf_file", None) or (qc.get("gguf_file") if isinstance(qc, dict) else None)
    if gguf:  # loaded from a GGUF file: weights dequantized, a plain float model (as rsq.io.loading does)
        options["model"] = str(Path(options["model"]) / gguf)
        del model.config.quantization_config
        model.hf_quantizer = None
    return model.eval().requires_grad_(False), tokenizer


def load(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    packed: bool = False,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """(model, tokenizer) from an rsq checkpoint directory. Off the GPU kernels (CPU, or no Triton)
    the quantized linears compute with W_hat dequantized once; ``packed=True`` keeps the packed
    reference path on every call."""
    return load_adopted(path, device=device, dtype=dtype, packed=packed)
