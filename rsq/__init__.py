"""rsq: Rotate, Scale, then Quantize — low-bit post-training quantization of LLMs.

Public API (everything else is import-by-path and may change):

* ``RSQConfig`` — the config tree (rsq.config);
* ``quantize(cfg, out_dir)`` — run a quantization job and write a checkpoint (rsq.run);
* ``load(path)`` — (model, tokenizer) from an rsq checkpoint (rsq.checkpoint.load);
"""

__version__ = "0.1.0"

from rsq.config import RSQConfig  # noqa: E402
from rsq.hf import install_hook as _install_hook  # noqa: E402

_install_hook()  # AutoModelForCausalLM.from_pretrained(rsq checkpoint) works after `import rsq`


def quantize(cfg, out, **kwargs):
    from rsq.run import run_quantize

    return run_quantize(cfg, out, **kwargs)


def load(path, device="cpu", dtype=None, packed=False):
    from rsq.checkpoint.load import load_quantized

    return load_quantized(path, device=device, dtype=dtype, packed=packed)


__all__ = ["RSQConfig", "quantize", "load", "__version__"]
