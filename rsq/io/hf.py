"""rsq checkpoints as Hugging Face citizens.

* ``import rsq`` registers ``quant_method: "rsq"`` with transformers (its quantizer registration
  API), so ``AutoModelForCausalLM.from_pretrained(DIR)`` on an rsq checkpoint builds rsq's quantized
  modules before the weights load and attaches the online rotations after: the same model as
  :func:`rsq.load`.
* Without ``import rsq``, transformers does not know the method; it would warn, skip the
  quantization and initialise every quantized linear at random. To make that fail instead, an rsq
  checkpoint's config.json carries ``transformers_weights`` (the config key naming the weights file
  that transformers reads first) set to :data:`GUARD`, which is no safetensors name: plain
  transformers raises a ValueError quoting it, which names rsq and the command to use. rsq's
  quantizer drops the key before transformers resolves the weights file.
* Models built by either loader carry an ``hf_quantizer`` and the class :func:`rsq_model_class`
  makes (:class:`RSQModelMixin` on the transformers class), whose ``save_pretrained`` writes a
  checkpoint both loaders read back (quantization_config, the guard, a neutral ``_name_or_path``).

The module swap itself is :func:`rsq.checkpoint.load.replace_quantized_modules`; this file only
adapts it to transformers' interface (so it follows the number-format registry when that lands).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from importlib.abc import Loader
from importlib.machinery import PathFinder
from pathlib import Path

import torch

from rsq.checkpoint.schema import GUARD, GUARD_KEY, QUANT_METHOD
from rsq.config import TORCH_DTYPES
from rsq.errors import RSQError
from rsq.io import loading
from rsq.io.hub import push_folder
from rsq.models.registry import resolve

log = logging.getLogger(__name__)


_REGISTERED = False


EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def neutral_name(source: str | None) -> str:
    """A ``_name_or_path`` naming where the model came from, never a local install path: the hub id
    or directory given, a GGUF file's name, the embedded default's hub id."""
    if not source:
        return EMBEDDED_HUB_ID
    if "site-packages" in source or "dist-packages" in source:
        return EMBEDDED_HUB_ID if loading.DEFAULT_MODEL_PACKAGE in source else Path(source).name
    if source.endswith(".gguf"):
        return Path(source).name
    return source


def source_dtype(source: str | None) -> torch.dtype | None:
    """The 16-bit dtype a source model declares (config.json ``dtype``/``torch_dtype``), None for
    float32 or undeclared. GGUF sources (the embedded default too) load dequantized in float32;
    their tensors come from float16 blocks, so they count as float16."""
    if not source or source.endswith(".gguf"):
        return torch.float16
    cfg_file = Path(source).expanduser() / "config.json"
    try:
        declared = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        try:
            declared = loading.load_config(source).to_dict()
        except RSQError as exc:  # load_config's one-line errors: hub unreachable, unknown id, bad config
            log.warning(
                "could not read the dtype %s declares (%s): the checkpoint's unquantized tensors are saved in the "
                "run's dtype instead; pass --save-dtype float16 or bfloat16 to choose",
                source,
                exc,
            )
            return None
    name = str(declared.get("dtype") or declared.get("torch_dtype") or "").replace("torch.", "")
    dtype = TORCH_DTYPES.get(name)
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def finish_config_dict(config: dict, model) -> dict:
    """config.json fields every rsq checkpoint writes: the architecture (from the model class when
    the source lacks it, as GGUF sources do), a neutral ``_name_or_path`` (from the recorded source)
    and the plain-transformers guard."""
    if not config.get("architectures"):
        config["architectures"] = [type(model).__name__]
    qc = config.get("quantization_config") or {}
    config["_name_or_path"] = neutral_name((qc.get("rsq_config") or {}).get("model"))
    config[GUARD_KEY] = GUARD
    return config


def complete_config_file(path: Path, model) -> None:
    """config.json in ``path`` completed as an rsq checkpoint (:func:`finish_config_dict`), if it
    holds an rsq quantization_config."""
    cfg_file = path / "config.json"
    config = json.loads(cfg_file.read_text())
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        return
    cfg_file.write_text(json.dumps(finish_config_dict(config, model), indent=2, default=str))


class RSQModelMixin:
    """What the class of a model with rsq's quantized modules adds to its transformers class.

    ``save_pretrained`` is transformers' own (the rsq quantizer says the model is serializable and
    the state dict is the packed buffers), then config.json completed as an rsq checkpoint:
    transformers drops ``transformers_weights`` on save, and without that guard plain transformers
    would load the packed checkpoint as random weights; transformers has no quantizer hook for
    top-level config keys. ``push_to_hub`` saves that way and uploads (rsq.io.hub.push_folder).

    :func:`adopt` gives a model the class :func:`rsq_model_class` makes: this mixin first, then
    the model's transformers class, under the same name (config.json's ``architectures`` stay
    transformers'). The methods are the class's, found through the MRO; none is set on the instance.
    """

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        complete_config_file(Path(save_directory), self)
        if push_to_hub:
            push_folder(Path(save_directory), kwargs.get("repo_id") or Path(save_directory).name)

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_folder(Path(tmp), repo_id, private=kwargs.get("private"))


_MODEL_CLASSES: dict[type, type] = {}


def rsq_model_class(cls: type) -> type:
    """``cls`` with :class:`RSQModelMixin` first in its MRO, same name and module (one per class)."""
    if issubclass(cls, RSQModelMixin):
        return cls
    if cls not in _MODEL_CLASSES:
        names = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
        _MODEL_CLASSES[cls] = type(cls.__name__, (RSQModelMixin, cls), names)
    return _MODEL_CLASSES[cls]


def adopt(model, qc: dict) -> None:
    """Make a model with rsq modules save and report itself as an rsq checkpoint: its
    quantization_config and ``hf_quantizer`` (as transformers' from_pretrained sets them for a
    quantized model) and its class :func:`rsq_model_class` (the one place an rsq-loaded model's
    class is set; rsq.load and the quantizer's from_pretrained hook both come here)."""
    register()
    model.config.quantization_config = RSQQuantizationConfig.from_dict(dict(qc))
    if getattr(model, "hf_quantizer", None) is None:
        model.hf_quantizer = RSQHfQuantizer(model.config.quantization_config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    model.__class__ = rsq_model_class(type(model))


def load_adopted(path, **kwargs):
    """rsq.checkpoint.load.load_quantized(path, **kwargs), the model adopted (:func:`adopt`)."""
    from rsq.checkpoint.load import load_quantized, read_quant_config

    _, qc = read_quant_config(Path(path))
    model, tokenizer = load_quantized(path, **kwargs)
    adopt(model, qc)  # save_pretrained / from_pretrained round trips
    return model, tokenizer


def load_any(model: str | None, packed: bool = False):
    """(model, tokenizer) for a plain model (rsq.io.loading.load_model, float32) or an rsq
    checkpoint directory (:func:`load_adopted`; ``packed``: keep the packed reference path on the
    CPU instead of the weights dequantized once, rsq/checkpoint/dense.py)."""
    if loading.is_rsq_checkpoint(model):
        return load_adopted(model, packed=packed)
    return loading.load_model(model)


def register() -> bool:
    """Register ``quant_method: "rsq"`` with transformers (idempotent). False where this
    transformers has no quantizer registration API."""
    global _REGISTERED
    if _REGISTERED:
        return True
    try:
        _define()
    except ImportError as exc:  # a transformers without the registration API: rsq.load still works
        log.debug("transformers quantizer registration unavailable: %s", exc)
        return False
    _REGISTERED = True
    return True


class _RegisterOnImport:
    """A one-shot meta-path finder: it finds ``transformers.quantizers`` as Python's own path
    finder does, and hands back a loader that runs that module's loader unchanged and then
    registers rsq (:func:`register`) and removes this finder. So ``import rsq`` does not import
    transformers (seconds), yet from_pretrained always sees rsq. No other module is touched."""

    TARGET = "transformers.quantizers"

    def find_spec(self, name, path=None, target=None):
        if name != self.TARGET:
            return None
        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(Loader):
    """``loader``'s module, then rsq registered (and the finder removed)."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        module.__loader__ = module.__spec__.loader = self.loader  # as if rsq had never been there
        uninstall_hook()
        register()

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: the wrapped loader's
        return getattr(self.loader, name)


_HOOK = _RegisterOnImport()


def install_hook() -> None:
    """Register ``quant_method: "rsq"`` with transformers now if its quantizers are imported, else
    as soon as they are (a one-shot finder at the head of ``sys.meta_path``). ``import rsq`` calls
    this, its only side effect; :func:`uninstall_hook` takes the finder back before it fires."""
    if _RegisterOnImport.TARGET in sys.modules:
        register()
    elif _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall_hook() -> None:
    """Remove the finder :func:`install_hook` installed (a no-op once it has fired)."""
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


RSQQuantizationConfig = None  # defined by _define() (needs transformers)
RSQHfQuantizer = None


def _drop_guard(config):
    if getattr(config, GUARD_KEY, None) == GUARD:
        delattr(config, GUARD_KEY)
    return config


def _define() -> None:
    global RSQQuantizationConfig, RSQHfQuantizer
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING:  # registered by an earlier import of this module
        RSQQuantizationConfig = AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD]
        RSQHfQuantizer = AUTO_QUANTIZER_MAPPING[QUANT_METHOD]
        return
    RSQQuantizationConfig = register_quantization_config(QUANT_METHOD)(_config_class(QuantizationConfigMixin))
    RSQHfQuantizer = register_quantizer(QUANT_METHOD)(_quantizer_class(HfQuantizer))


def _config_class(base: type) -> type:
    """rsq's quantization config class on transformers' ``QuantizationConfigMixin``."""

    class _Config(base):
        """rsq's quantization_config (rsq/checkpoint/save.py writes it), kept key for key."""

        def __init__(self, **kwargs):
            kwargs["quant_method"] = QUANT_METHOD
            for key, value in kwargs.items():
                setattr(self, key, value)

        def to_dict(self) -> dict:
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

        def to_diff_dict(self) -> dict:
            return self.to_dict()

    return _Config


def _quantizer_class(base: type) -> type:
    """rsq's quantizer on transformers' ``HfQuantizer``: builds rsq's modules in from_pretrained."""

    class _Quantizer(base):
        """Loads rsq checkpoints in from_pretrained: rsq modules before the weights, rotations after."""

        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            from rsq.checkpoint.load import check_format_version

            check_format_version(self.quantization_config.to_dict(), "quantization_config")

        # Hooks that see the model config before transformers resolves the weights file, where the
        # plain-transformers guard is dropped: update_attn_implementation (5.2x), update_tp_plan /
        # update_ep_plan (5.0-5.1x). transformers 4.x checks the guard before any quantizer hook.
        def update_attn_implementation(self, config):
            return _drop_guard(config)

        def update_tp_plan(self, config):
            return _drop_guard(config)

        def update_ep_plan(self, config):
            return _drop_guard(config)

        def _process_model_before_weight_loading(self, model, **kwargs):
            from rsq.checkpoint.load import replace_quantized_modules

            qc = self.quantization_config.to_dict()
            dtype = kwargs.get("dtype") or model.dtype
            has_bias = {}
            for full in qc["modules"]:
                if getattr(model.get_submodule(full), "bias", None) is not None:
                    has_bias[f"{full}.bias"] = True
            replace_quantized_modules(model, qc, has_bias, dtype)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from rsq.checkpoint.load import attach_online_rotations

            qc = self.quantization_config.to_dict()
            # transformers built the model: its family is looked up once, here
            attach_online_rotations(model, qc, resolve(model.config))
            model.requires_grad_(False)
            adopt(model, qc)
            from rsq.checkpoint.dense import dequantize_once

            dequantize_once(model, keep_packed=True)
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            # rsq's modules trace without graph breaks (kernels are custom ops, rsq/kernels/ops.py),
            # so generate(cache_implementation="static") may compile the decode step
            return True

    return _Quantizer
